"""What SmolLM2 itself knows about a wrong sum: its likelihood and linear probes of its hidden states.

    .venv/bin/python bench/verifier_probe.py [--pairs 400 --threads 2]

Why `make demo MODEL=smollm2`'s verifier stays at chance (README, issue 12), measured without
training one. Pairs: the gold solution of a clean synthetic problem (data/synthetic.py, the
demo's task) and its `slip_solution` twin, one stated sum off by 1-10 and carried through, so
the two differ only where the arithmetic is wrong. Each is rendered as the demo's verifier sees
it (chat template, prompt + reply + end-of-turn) and run once through the untouched
SmolLM2-135M-Instruct (no grad). Printed, as the share of held-out pairs in which the gold one
scores higher:

* the model's own likelihood: the summed log-prob of the reply tokens, and their minimum;
* a linear probe (pairwise logistic regression on feature differences, L2 weight chosen on a
  validation split) of the hidden state after layer L, at the reply's last token (what
  `--reduce last` reads) and averaged over the reply (`--reduce mean`).

Pairs are split 60 / 20 / 20 into probe-train / validation / test, in file order.
"""
from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

LAYERS = (8, 14, 20, 24, 27, 29)
WEIGHT_DECAYS = (1e-3, 1e-2, 1e-1, 1.0)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def pairs(n: int, seed: int) -> list[tuple[str, str, str]]:
    """(instruction, gold solution, slipped twin) for the first n clean synthetic problems that have a step."""
    from llama_rlhf.data.pairs import slip_solution
    from llama_rlhf.data.synthetic import make_splits

    train, _ = make_splits(4000, 10, seed, 2, 0.0)
    rng, out = random.Random(seed), []
    for rec in train:
        gold = rec["output"][0]  # synthetic records hold one solution
        bad = slip_solution(gold, rng)
        if bad is not None:
            out.append((rec["instruction"], gold, bad))
        if len(out) == n:
            break
    return out


@torch.no_grad()
def features(model, tok, data) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    """Summed and minimum reply log-probs [n, 2], and per layer the last-token and mean hidden states [n, 2, dim]."""
    from llama_rlhf.data.encoding import PromptFormat, encode_prompt, encode_response

    fmt, seen = PromptFormat(template="chat"), {}
    hooks = [model.layers[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[0]))
             for i in LAYERS]
    sums, mins, last, mean = [], [], {i: [] for i in LAYERS}, {i: [] for i in LAYERS}
    for instruction, *texts in data:
        prompt = encode_prompt(tok, instruction, fmt)
        for text in texts:
            reply = encode_response(tok, text, fmt, instruction, prompt=prompt)
            ids = torch.tensor([prompt + reply])
            logits = model.output(model.hidden(ids))[0, len(prompt) - 1:-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None])[:, 0]
            sums.append(lp.sum())
            mins.append(lp.min())
            for i in LAYERS:
                last[i].append(seen[i][-1])
                mean[i].append(seen[i][len(prompt):].mean(0))
    for h in hooks:
        h.remove()
    n = len(data)
    stack = lambda xs: torch.stack(xs).view(n, 2, -1)  # noqa: E731
    return (torch.stack(sums).view(n, 2), torch.stack(mins).view(n, 2),
            {i: stack(v) for i, v in last.items()}, {i: stack(v) for i, v in mean.items()})


def probe(feats: torch.Tensor, a: int, b: int) -> tuple[float, float]:
    """(validation, test) pair accuracy of a pairwise logistic probe trained on pairs [0, a),
    its L2 weight picked on [a, b), tested on [b, n)."""
    f = feats / feats[:a].reshape(-1, feats.shape[-1]).std(0).clamp_min(1e-3)
    d = f[:, 0] - f[:, 1]  # gold - slipped
    x, y = torch.cat([d[:a], -d[:a]]), torch.cat([torch.ones(a), torch.zeros(a)])
    best = (-1.0, 0.0)
    for wd in WEIGHT_DECAYS:
        w = torch.zeros(x.shape[1], requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=200)

        def closure():
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(x @ w, y) + wd * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            val, test = ((d[a:b] @ w) > 0).float().mean().item(), ((d[b:] @ w) > 0).float().mean().item()
        best = max(best, (val, test))
    return best


def main() -> None:
    opt = parse()
    torch.set_num_threads(opt.threads)
    from llama_rlhf.checkpoint import load_source
    from llama_rlhf.demo import smollm2_gguf
    from llama_rlhf.models import build_model
    from llama_rlhf.tokenizers import load_tokenizer

    path = smollm2_gguf()
    sd, args = load_source(path)
    model = build_model(args, "cpu", torch.float32)
    model.load_state_dict(sd)
    model.eval()
    data = pairs(opt.pairs, opt.seed)
    t0 = time.perf_counter()
    sums, mins, last, mean = features(model, load_tokenizer(path), data)
    n = len(data)
    a, b = int(0.6 * n), int(0.8 * n)
    print(f"{n} (gold, one wrong sum) pairs of the clean synthetic task, SmolLM2-135M-Instruct untouched, "
          f"{time.perf_counter() - t0:.0f} s; probe train / validation / test {a} / {b - a} / {n - b} pairs")
    print(f"likelihood, test pairs: summed reply log-prob picks gold {(sums[b:, 0] > sums[b:, 1]).float().mean():.1%}, "
          f"minimum token log-prob {(mins[b:, 0] > mins[b:, 1]).float().mean():.1%} "
          f"(all {n} pairs: {(sums[:, 0] > sums[:, 1]).float().mean():.1%} / {(mins[:, 0] > mins[:, 1]).float().mean():.1%})")
    print("linear probe of the hidden state after layer L (validation / test pair accuracy):")
    for i in LAYERS:
        (lv, lt), (mv, mt) = probe(last[i], a, b), probe(mean[i], a, b)
        print(f"  layer {i:2d}: last token {lv:.1%} / {lt:.1%}   reply mean {mv:.1%} / {mt:.1%}")


if __name__ == "__main__":
    main()
