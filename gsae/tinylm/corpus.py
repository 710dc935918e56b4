"""A procedural English-like corpus with structure to learn (the training text of ``gsae-tiny``).

No text is copied from anywhere: every document is generated from the small lexicon and the
templates below, deterministically from ``(seed, document index)`` (document ``i`` of seed ``s`` is
the same whatever else is generated, so a stream can start at any document).

Grammar of a document::

    DOC     := TITLE INTRO{2-4} BODY{4-10} QA{0-3}          sentences joined by spaces
    TITLE   := "A story about TOWN." | "Life in TOWN." | "News from TOWN." | "This is about TOWN."
    INTRO   := introduces one ENTITY (its attributes are fixed for the whole document)
    BODY    := [CONNECTIVE ","] one of: FACT | JOB | ANIMAL | GIVE | MEET | COMPARE | COUNT | IF
    QA      := "Question: ... Answer: ..."   recalls an attribute stated earlier in the document

    ENTITY  := PERSON  (name, she/he, a JOB with a workplace and an activity, height and age ranks)
             | ANIMALS (a kind, a COLOUR, a SIZE, a count n >= 1, optionally owned by a PERSON)

A document is about one TOWN (its topic) and 2-4 entities, and every body sentence reuses them
(by name, by "the <kind>", or by pronoun: she/he/it/they). Structure the model can learn:

* agreement: an entity with n = 1 is singular ("the fox is", "it eats", "There is a fox"), with
  n > 1 plural ("the foxes are", "they eat", "There are three foxes"); irregular plurals (mice,
  wolves, geese); "A and B are"; nouns after numbers ("one apple", "two apples");
* world knowledge shared by all documents: a job's workplace and activity (a baker works at the
  bakery and bakes bread), an animal's sound and food (cows moo and eat grass);
* in-document knowledge: colours, sizes, owners, counts, jobs, said once and recalled later (QA);
* reasoning: transitive comparisons consistent with hidden ranks ("A is taller than B. B is taller
  than C. So A is taller than C."; "the tallest"), arithmetic on counts ("has three apples ... gives
  her two more ... Now she has five apples"), counting aloud, and if-then (modus ponens).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

FEMALE = "Alice Anna Beth Clara Daisy Emma Fiona Grace Hannah Iris Julia Kate Lily Maya Nora Olive Paula Rosa Sara Tessa Uma Vera Wendy Zoe".split()
MALE = "Adam Ben Carl David Eric Frank George Henry Ivan Jack Kevin Leo Max Nick Oscar Peter Quinn Ray Sam Tom Victor Will Yusuf Zack".split()
NAMES = FEMALE + MALE
#: job -> (workplace, activity in base form)
JOBS = {
    "baker": ("bakery", "bake bread"), "teacher": ("school", "teach children"), "farmer": ("farm", "grow wheat"),
    "doctor": ("hospital", "help sick people"), "sailor": ("harbour", "sail boats"), "painter": ("studio", "paint pictures"),
    "fisher": ("river", "catch fish"), "singer": ("theatre", "sing songs"), "builder": ("building site", "build houses"),
    "gardener": ("park", "plant flowers"), "librarian": ("library", "lend books"), "cook": ("kitchen", "make soup"),
    "pilot": ("airport", "fly planes"), "nurse": ("clinic", "care for patients"), "tailor": ("shop", "sew coats"),
    "miner": ("mine", "dig for coal"), "judge": ("court", "read the law"), "potter": ("workshop", "make pots"),
}
#: kind -> (plural, sound verb, food)
ANIMALS = {
    "cat": ("cats", "meow", "fish"), "dog": ("dogs", "bark", "bones"), "fox": ("foxes", "yelp", "berries"),
    "owl": ("owls", "hoot", "beetles"), "cow": ("cows", "moo", "grass"), "horse": ("horses", "neigh", "hay"),
    "duck": ("ducks", "quack", "bread"), "goat": ("goats", "bleat", "leaves"), "pig": ("pigs", "grunt", "apples"),
    "mouse": ("mice", "squeak", "cheese"), "frog": ("frogs", "croak", "flies"), "bee": ("bees", "buzz", "nectar"),
    "lion": ("lions", "roar", "meat"), "wolf": ("wolves", "howl", "meat"), "goose": ("geese", "honk", "corn"),
    "rabbit": ("rabbits", "thump", "carrots"), "bear": ("bears", "growl", "honey"), "hen": ("hens", "cluck", "seeds"),
}
COLOURS = "red blue green yellow white black brown grey orange purple pink golden".split()
SIZES = ["tiny", "small", "big", "huge"]  # ordered: a bigger index is bigger
OBJECTS = {o: o + ("es" if o.endswith(("x", "sh", "ch")) else "s") for o in
           "apple book boat box coin cup egg flower hat key kite lamp letter pear pen shell stone ball candle basket".split()}
NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()
TOWNS = [a + b for a in "Ash Bel Cor Dun El Fern Glen Hal Ivy Kel Lin Mar North Oak Pen Red Stan Tor Wes Wil".split()
         for b in "brook ford wick ton dale by field mouth stead well more holm".split()]
PLACES = ["market", "bridge", "hill", "lake", "square", "forest", "meadow", "station", "garden", "beach"]
#: comparative attribute -> (comparative, superlative); people carry one hidden rank per attribute
COMPARE = {"tall": ("taller", "tallest"), "old": ("older", "oldest"), "fast": ("faster", "fastest"), "strong": ("stronger", "strongest")}
CONNECTIVES = ["Then", "Later", "After that", "In the morning", "One day", "Meanwhile", "At noon", "In the evening", "Also", "Soon"]
WEATHER = [("it rains", "It rains today"), ("the sun is out", "The sun is out today"), ("it snows", "It snows today"),
           ("the wind is strong", "The wind is strong today")]


def s3(verb_phrase: str) -> str:
    """Third person singular of a verb phrase (the first word inflects): "fly planes" -> "flies planes"."""
    v, _, rest = verb_phrase.partition(" ")
    if v.endswith("y") and v[-2] not in "aeiou":
        v = v[:-1] + "ies"
    elif v.endswith(("s", "sh", "ch", "x", "z", "o")):
        v += "es"
    else:
        v += "s"
    return f"{v} {rest}".strip()


def art(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def count_noun(n: int, sing: str, plur: str) -> str:
    return f"{NUMBERS[n]} {sing if n == 1 else plur}"


@dataclass
class Person:
    name: str
    female: bool
    job: str
    ranks: dict[str, int] = field(default_factory=dict)
    plural = False

    @property
    def subj(self) -> str:
        return "she" if self.female else "he"

    @property
    def obj(self) -> str:
        return "her" if self.female else "him"

    @property
    def poss(self) -> str:
        return "her" if self.female else "his"


@dataclass
class Animals:
    kind: str
    colour: str
    size: int
    n: int
    owner: Person | None = None

    @property
    def plural(self) -> bool:
        return self.n > 1

    @property
    def noun(self) -> str:
        return ANIMALS[self.kind][0] if self.plural else self.kind

    @property
    def ref(self) -> str:
        return f"the {self.noun}"

    @property
    def subj(self) -> str:
        return "they" if self.plural else "it"


def be(e) -> str:
    return "are" if e.plural else "is"


def verb(e, phrase: str) -> str:
    return phrase if e.plural else s3(phrase)


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


class _Doc:
    """One document's world (town, entities) and its sentence generators."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = r = rng
        self.town = r.choice(TOWNS)
        names = r.sample(NAMES, r.randint(2, 3))
        self.people = [Person(nm, nm in FEMALE, r.choice(list(JOBS))) for nm in names]
        for attr in COMPARE:  # hidden total orders: rank 0 is the most (tallest, oldest, ...)
            for rank, p in enumerate(r.sample(self.people, len(self.people))):
                p.ranks[attr] = rank
        kinds = r.sample(list(ANIMALS), r.randint(1, 2))
        self.animals = [Animals(k, r.choice(COLOURS), r.randrange(len(SIZES)), r.choice([1, 1, 2, 3, 4, 5]),
                                r.choice([None, *self.people])) for k in kinds]
        self.last = None  # the entity the previous sentence was about: the only one a pronoun may refer to

    def who(self, e, then=None) -> str:
        """``e``'s pronoun if the previous sentence was about ``e``, else its name; ``then`` becomes the topic."""
        s = e.subj if e is self.last else getattr(e, "name", None) or e.ref
        self.last = e if then is None else then
        return s

    def intro_person(self, p: Person) -> str:
        job, self.last = p.job, p
        return self.rng.choice([
            f"{p.name} is {art(job)} in {self.town}.", f"{p.name} lives in {self.town} and works as {art(job)}.",
            f"In {self.town} there is {art(job)} called {p.name}.", f"{p.name} is {art(job)}. {cap(p.subj)} lives in {self.town}.",
        ])

    def intro_animals(self, a: Animals) -> str:
        desc = f"{SIZES[a.size]} {a.colour} {a.noun}"
        what = art(desc) if a.n == 1 else f"{NUMBERS[a.n]} {desc}"
        self.last = a.owner
        if a.owner is not None:
            return f"{a.owner.name} has {what}."
        return self.rng.choice([f"There {be(a)} {what} near the {self.rng.choice(PLACES)}.", f"In {self.town} there {be(a)} {what}."])

    def job(self, p: Person) -> str:
        place, act = JOBS[p.job]
        r = self.rng
        x = self.who(p)
        return r.choice([
            f"{x} works at the {place}.", f"Every day {x} {s3(act)}.", f"{x} likes to {act}.",
            f"As {art(p.job)}, {x} {s3(act)} at the {place}.", f"{x} is a good {p.job}.", f"At the {place}, {x} {s3(act)}.",
        ])

    def animal(self, a: Animals) -> str:
        _, sound, food = ANIMALS[a.kind]
        r = self.rng
        if a.owner is not None and r.random() < 0.3:
            o = a.owner
            return r.choice([f"{o.name}'s {a.noun} {be(a)} {a.colour}.", f"{self.who(o)} feeds {a.ref} {food}.",
                             f"{self.who(o)} loves {o.poss} {a.noun}."])
        the = self.who(a)
        return r.choice([
            f"{the} {be(a)} {a.colour}.", f"{the} {verb(a, 'eat')} {food}.", f"{the} {verb(a, sound)} loudly.",
            f"{the} {be(a)} very {SIZES[a.size]}.", f"{the} {verb(a, 'like')} to {sound}.",
            f"{the} {be(a)} {SIZES[a.size]} and {a.colour}.", f"{the} {verb(a, 'run')} to the {r.choice(PLACES)}.",
        ])

    def give(self, p: Person, q: Person) -> str:
        r = self.rng
        o = r.choice(list(OBJECTS))
        a, b = r.randint(1, 9), r.randint(1, 9)
        self.last = p
        if r.random() < 0.5:
            return (f"{p.name} has {count_noun(a, o, OBJECTS[o])}. {q.name} gives {p.obj} {NUMBERS[b]} more. "
                    f"Now {p.name} has {count_noun(a + b, o, OBJECTS[o])}.")
        a, b = max(a, b) + 1, min(a, b)
        return (f"{p.name} has {count_noun(a, o, OBJECTS[o])}. {cap(p.subj)} gives {count_noun(b, o, OBJECTS[o])} to {q.name}. "
                f"Now {p.name} has {count_noun(a - b, o, OBJECTS[o])} and {q.name} has {count_noun(b, o, OBJECTS[o])}.")

    def meet(self, p: Person, q: Person) -> str:
        r = self.rng
        place, self.last = r.choice(PLACES), None
        return r.choice([
            f"{p.name} and {q.name} walk to the {place}. They are friends.", f"{p.name} visits {q.name} at the {JOBS[q.job][0]}.",
            f"{p.name} and {q.name} are at the {place}.", f"{p.name} meets {q.name} near the {place}, and they talk.",
            f"{p.name} asks {q.name} for help, and {q.subj if q.female != p.female else q.name} helps {p.obj}.",
        ])

    def compare(self, attr: str) -> str:
        r, (cmp_, sup) = self.rng, COMPARE[attr]
        ps = sorted(self.people, key=lambda p: p.ranks[attr])
        self.last = None
        if len(ps) == 3 and r.random() < 0.6:
            a, b, c = ps
            return f"{a.name} is {cmp_} than {b.name}. {b.name} is {cmp_} than {c.name}. So {a.name} is {cmp_} than {c.name}."
        i, j = sorted(r.sample(range(len(ps)), 2))
        return r.choice([f"{ps[i].name} is {cmp_} than {ps[j].name}.", f"{ps[0].name} is the {sup} of them all.",
                         f"{ps[j].name} is not as {attr} as {ps[i].name}."])

    def count(self) -> str:
        r = self.rng
        many, self.last = [a for a in self.animals if a.plural], None
        if many and r.random() < 0.5:
            a = r.choice(many)
            return f"{r.choice(self.people).name} counts {a.ref}: {', '.join(NUMBERS[1:a.n + 1])}. There are {NUMBERS[a.n]} {a.noun}."
        o, n = r.choice(list(OBJECTS)), r.randint(2, 7)
        return f"On the table there are {NUMBERS[n]} {OBJECTS[o]}: {', '.join(NUMBERS[1:n + 1])}."

    def if_then(self) -> str:
        r = self.rng
        if r.random() < 0.5:
            p = r.choice(self.people)
            cond, fact = r.choice(WEATHER)
            place, self.last = JOBS[p.job][0], p
            return f"If {cond}, {p.name} stays at the {place}. {fact}, so {p.name} stays at the {place}."
        a = r.choice(self.animals)
        food, self.last = ANIMALS[a.kind][2], a
        return f"If {a.ref} {be(a)} hungry, {a.subj} {verb(a, 'eat')} {food}. {cap(a.ref)} {be(a)} hungry, so {a.subj} {verb(a, 'eat')} {food}."

    def question(self) -> str:
        r = self.rng
        p, a = r.choice(self.people), r.choice(self.animals)
        kinds = [
            f"Question: What colour {be(a)} {a.ref}? Answer: {a.colour}.",
            f"Question: Where does {p.name} work? Answer: at the {JOBS[p.job][0]}.",
            f"Question: What is {p.name}'s job? Answer: {p.name} is {art(p.job)}.",
            f"Question: Where does {p.name} live? Answer: in {self.town}.",
            f"Question: How many {ANIMALS[a.kind][0]} are there? Answer: {NUMBERS[a.n]}.",
        ]
        if a.owner is not None:
            kinds.append(f"Question: Who has {a.ref}? Answer: {a.owner.name}.")
        attr = r.choice(list(COMPARE))
        x, y = r.sample(self.people, 2)
        w = x if x.ranks[attr] < y.ranks[attr] else y
        kinds.append(f"Question: Who is {COMPARE[attr][0]}, {x.name} or {y.name}? Answer: {w.name}.")
        return r.choice(kinds)

    def body(self) -> str:
        r = self.rng
        kind = r.choices(["job", "animal", "give", "meet", "compare", "count", "if"], [3, 4, 2, 2, 2, 1, 1.5])[0]
        if kind == "job":
            s = self.job(r.choice(self.people))
        elif kind == "animal":
            s = self.animal(r.choice(self.animals))
        elif kind == "give":
            s = self.give(*r.sample(self.people, 2))
        elif kind == "meet":
            s = self.meet(*r.sample(self.people, 2))
        elif kind == "compare":
            s = self.compare(r.choice(list(COMPARE)))
        elif kind == "count":
            s = self.count()
        else:
            s = self.if_then()
        if r.random() < 0.3:  # a connective; the sentence's first word is lower-cased unless it is a name
            if s.split(" ", 1)[0].split("'")[0] not in NAMES:
                s = s[0].lower() + s[1:]
            return f"{r.choice(CONNECTIVES)}, {s}"
        return cap(s)

    def text(self) -> str:
        r = self.rng
        title = r.choice(["A story about {}.", "Life in {}.", "News from {}.", "This is about {}."]).format(self.town)
        intro = [self.intro_person(p) for p in self.people] + [self.intro_animals(a) for a in self.animals]
        body = [self.body() for _ in range(r.randint(4, 10))]
        qa = [self.question() for _ in range(r.randint(0, 3))]
        return " ".join([title, *intro, *body, *qa])


def document(seed: int, index: int) -> str:
    """Document ``index`` of the stream of ``seed`` (independent of every other document)."""
    return _Doc(random.Random(f"gsae-corpus:{seed}:{index}")).text()


def documents(seed: int, n: int | None = None, start: int = 0) -> Iterator[str]:
    """Documents ``start, start+1, ...`` of the stream of ``seed``: ``n`` of them, or endless if ``None``."""
    i = start
    while n is None or i < start + n:
        yield document(seed, i)
        i += 1


def rows(seed: int = 0, n: int | None = None, start: int = 0) -> Iterator[dict]:
    """``{"text": document}`` rows (what a ``datasets`` stream yields), without the ``datasets`` machinery."""
    for text in documents(seed, n, start):
        yield {"text": text}


def as_dataset(seed: int = 0, n: int | None = None):
    """The corpus as a ``datasets.IterableDataset`` with one column ``text`` (endless if ``n`` is None)."""
    import datasets

    return datasets.IterableDataset.from_generator(rows, gen_kwargs={"seed": seed, "n": n})
