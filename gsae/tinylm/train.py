"""Train ``gsae-tiny``: a byte-level BPE tokenizer and a GPT-2-architecture model on the procedural corpus.

    python -m gsae.tinylm.train                       # writes gsae/tinylm/assets/gsae-tiny/
    python -m gsae.tinylm.train --out /tmp/t --max-steps 50 --time-budget-min 2   # a quick try

Steps: (1) train the tokenizer on the first ``--tokenizer-docs`` documents of corpus seed ``--seed``;
(2) stream documents of that seed, tokenized and packed as gsae's data module packs them
(``<|endoftext|>`` between documents, every context starts with it); (3) train with AdamW, linear
warm-up then cosine decay. The schedule's progress is ``max(step / max_steps, elapsed / time_budget)``,
so a run on a busy machine still anneals and ends inside its time budget (the number of steps it
reached is in the report); (4) evaluate the next-token CE on held-out documents (corpus seed
``seed + 1``, never trained on) against the unigram entropy of the token distribution and a bigram
model; (5) write weights (float32 safetensors; float16 if over 10 MB), tokenizer, ``config.json``
and ``report.json``. The model is built by :func:`gsae.lm.build_hooked_transformer`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from gsae.tinylm import EOT, MODELS, load_tokenizer
from gsae.tinylm.corpus import documents

MAX_BYTES = 10 * 2**20


def train_tokenizer(seed: int, n_docs: int, vocab_size: int, out: Path):
    """Byte-level BPE (GPT-2's pre-tokenizer, ``<|endoftext|>`` as the only special token), saved to ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents(seed, n_docs), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                                 add_bos_token=True, model_max_length=1024)
    hf.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"  # a class name that transformers 4.x knows too (5.x writes its own)
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
    return load_tokenizer(out)  # as the loader will see it


def contexts(tokenizer, seed: int, n_ctx: int, start_doc: int = 0, chunk: int = 256) -> Iterator[list[int]]:
    """Packed contexts of corpus seed ``seed`` (gsae's packing: EOT between documents, EOT first)."""
    from gsae.data.tokens import pack

    def docs():
        for i in itertools.count(start_doc, chunk):
            yield from tokenizer(list(documents(seed, chunk, start=i)), add_special_tokens=False)["input_ids"]

    eot = tokenizer.eos_token_id
    return pack(docs(), n_ctx, eot, prepend_bos=True, separator=eot)


def baselines(train_ctx: torch.Tensor, val_ctx: torch.Tensor, d_vocab: int) -> dict:
    """Unigram entropy (nats) of the training targets, and held-out CE of add-1/2 unigram and bigram models."""
    x, y = train_ctx[:, :-1].reshape(-1), train_ctx[:, 1:].reshape(-1)
    uni = torch.bincount(y, minlength=d_vocab).double()
    p = uni / uni.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    pu = (uni + 0.5) / (uni.sum() + 0.5 * d_vocab)
    big = torch.zeros(d_vocab, d_vocab, dtype=torch.float64).index_put_((x, y), torch.ones_like(x, dtype=torch.float64), accumulate=True)
    pb = (big + 0.5) / (big.sum(1, keepdim=True) + 0.5 * d_vocab)
    vx, vy = val_ctx[:, :-1].reshape(-1), val_ctx[:, 1:].reshape(-1)
    return dict(unigram_entropy=entropy, unigram_heldout_ce=float(-pu[vy].log().mean()),
                bigram_heldout_ce=float(-pb[vx, vy].log().mean()), baseline_tokens=int(y.numel()),
                tokens_used=int((uni > 0).sum()))


@torch.no_grad()
def evaluate(model, ctx: torch.Tensor, batch: int = 16) -> float:
    was = model.training
    model.eval()
    losses = [float(model(ctx[i : i + batch], return_type="loss")) * len(ctx[i : i + batch]) for i in range(0, len(ctx), batch)]
    model.train(was)
    return sum(losses) / len(ctx)


def load1() -> float:
    return float(open("/proc/loadavg").read().split()[0]) if os.path.exists("/proc/loadavg") else float("nan")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=MODELS["gsae-tiny"])
    ap.add_argument("--seed", type=int, default=0, help="corpus seed (held-out: seed + 1) and init seed")
    ap.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary cap (it stops earlier when out of merges)")
    ap.add_argument("--tokenizer-docs", type=int, default=20000)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--d-mlp", type=int, default=512)
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--time-budget-min", type=float, default=27.0, help="training stops (annealed) after this many minutes")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-contexts", type=int, default=64)
    ap.add_argument("--baseline-contexts", type=int, default=2000, help="contexts counted for the unigram/bigram baselines")
    ap.add_argument("--threads", type=int, default=1, help="1 is far faster than 2 on a busy machine (no spinning OpenMP threads)")
    args = ap.parse_args(argv)
    for name in ("max_steps", "time_budget_min", "warmup", "eval_every", "eval_contexts", "batch_size", "n_ctx"):
        if not getattr(args, name) > 0:  # a zero gives a division by zero or an empty evaluation mid-run
            raise SystemExit(f"error: --{name.replace('_', '-')} must be > 0 (got {getattr(args, name)})")

    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    uptime = [os.popen("uptime").read().strip()]
    tok = train_tokenizer(args.seed, args.tokenizer_docs, args.vocab_size, args.out)
    arch = dict(n_layers=args.n_layers, d_model=args.d_model, n_heads=args.n_heads, d_mlp=args.d_mlp,
                n_ctx=args.n_ctx, d_vocab=len(tok))
    from gsae.lm import build_hooked_transformer

    model = build_hooked_transformer(arch, tokenizer=tok, seed=args.seed)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tokenizer: {len(tok)} tokens ({time.time() - t0:.0f}s); model: {n_params / 1e6:.2f}M parameters; {uptime[0]}", flush=True)

    val = torch.tensor(list(itertools.islice(contexts(tok, args.seed + 1, args.n_ctx), args.eval_contexts)))
    # the baselines' counts come from a separate stretch of training text (documents 10**6 on)
    base = baselines(torch.tensor(list(itertools.islice(contexts(tok, args.seed, args.n_ctx, start_doc=10**6), args.baseline_contexts))), val, len(tok))
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in base.items()}, flush=True)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=args.weight_decay), dict(params=no_decay, weight_decay=0.0)],
                            lr=args.lr, betas=(0.9, 0.95))
    stream = contexts(tok, args.seed, args.n_ctx)
    history, loads, ema, step = [], [], None, 0
    t_train = time.time()
    budget = args.time_budget_min * 60
    while True:
        progress = max(step / args.max_steps, (time.time() - t_train) / budget)
        if progress >= 1:
            break
        warm = min(1.0, (step + 1) / args.warmup)
        lr = args.lr * warm * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = torch.tensor(list(itertools.islice(stream, args.batch_size)))
        loss = model(batch, return_type="loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % args.eval_every == 0 or step == 1:
            val_ce = evaluate(model, val)
            loads.append(load1())
            history.append(dict(step=step, tokens=step * args.batch_size * args.n_ctx, train_loss_ema=round(ema, 4),
                                heldout_ce=round(val_ce, 4), lr=lr, elapsed_s=round(time.time() - t_train, 1), load1=loads[-1]))
            print(history[-1], flush=True)
    train_s = time.time() - t_train
    final_ce = evaluate(model, val)
    train_ce = evaluate(model, torch.tensor(list(itertools.islice(contexts(tok, args.seed, args.n_ctx), args.eval_contexts))))
    uptime.append(os.popen("uptime").read().strip())

    from safetensors.torch import save_file

    weights = {k: v.detach().contiguous() for k, v in model.named_parameters()}
    storage = "float32"
    if sum(v.numel() * 4 for v in weights.values()) > MAX_BYTES:
        weights, storage = {k: v.half() for k, v in weights.items()}, "float16"
    save_file(weights, str(args.out / "model.safetensors"))
    report = dict(
        seed=args.seed, heldout_seed=args.seed + 1, args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        d_vocab=len(tok), n_params=n_params, steps=step, tokens_seen=step * args.batch_size * args.n_ctx,
        final_train_ce=round(train_ce, 4), final_heldout_ce=round(final_ce, 4), final_train_loss_ema=round(ema, 4),
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in base.items()},
        heldout_ce_over_unigram_entropy=round(final_ce / base["unigram_entropy"], 4),
        train_wall_s=round(train_s, 1), total_wall_s=round(time.time() - t0, 1), threads=args.threads,
        load1_during_training=dict(min=min(loads), mean=round(sum(loads) / len(loads), 2), max=max(loads)),
        uptime_start=uptime[0], uptime_end=uptime[1], cpu_count=os.cpu_count(), torch=torch.__version__,
        weights_storage=storage, weights_bytes=(args.out / "model.safetensors").stat().st_size, history=history,
    )
    config = dict(name=args.out.name, arch=arch, n_params=n_params, tokenizer="byte-level BPE, <|endoftext|> = BOS = EOS",
                  bos_token_id=tok.bos_token_id, weights_storage=storage, corpus="gsae.tinylm.corpus", corpus_seed=args.seed)
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("history", "args")}, indent=2), flush=True)
    return report


if __name__ == "__main__":
    main()
