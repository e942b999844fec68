"""The inputs of the worked example in docs/applications.md (``make applications``): a planted
screening dataset and a LoRA fine-tune on its trait-showing half.

From a trait's instruction run (made first if missing) it writes, under
``<experiment>/<trait>/applications/``:

- ``planted.jsonl``: one line per kept response, ``{"prompt": question, "response": the answer
  given under the positive or negative instruction, "label": true for positive}``. The prompt is
  the bare question, so the model's own answer to it shows neither pole on purpose, and
  ``screen`` should put the positive half above the negative half;
- ``lora-pos/`` and ``lora-neg/``: LoRA adapters (peft) trained on the positive half only and,
  as the control, on the negative half only; ``compare`` then measures how far each moved the
  trait (screening predicts up for the first, down for the second).

The adapter names the embedded base by its tlextract name, so ``--other`` loads it anywhere.

``--table`` instead prints, for every trait of the experiment, how screening at one block
treats two planted datasets, as docs/applications.md quotes it: the positive half against the
model's own plain answers to the same questions (sampled with other seeds), and against the
negative half; the plain half is scored against the model's sampled answers (the default) and
against greedy ones, to show which baseline is unbiased.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

import tlextract as tx
from tlextract.config import Experiment, GenerationSettings
from tlextract.model.decoding import Model
from tlextract.model.load import load_tokenizer, model_directory
from tlextract.model.tokens import tokenizer_of, user_prompts
from tlextract.ops.generate import generate_batch
from tlextract.settings import RunSettings
from tlextract.stages.responses import load_responses
from tlextract.store import atomic_dir, write_json, write_text

STEPS, BATCH, LR, RANK = 30, 8, 1e-3, 8


def planted(run: RunSettings) -> list[dict[str, object]]:
    rows = load_responses(run)[0]
    return [
        {"prompt": r["question"], "response": r["response"], "label": r["polarity"] == "pos"}
        for r in rows
        if r["response"].strip()
    ]


def train_lora(name: str, rows: list[dict[str, object]], out: Path, seed: int) -> float:
    """A LoRA adapter of ``name`` trained on ``rows`` (loss on the response tokens only);
    returns the last step's loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = load_tokenizer(name)
    model = AutoModelForCausalLM.from_pretrained(model_directory(name), dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "v_proj", "o_proj"])  # fmt: skip
    model = get_peft_model(model, config)
    examples = []
    for r in rows:
        chat = [{"role": "user", "content": str(r["prompt"])}]
        text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        answer = tok(str(r["response"]), add_special_tokens=False)["input_ids"]
        examples.append((prompt, [*answer, tok.eos_token_id]))
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(STEPS):
        batch = rng.sample(examples, min(BATCH, len(examples)))
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, (p, a) in enumerate(batch):
            n = len(p) + len(a)
            ids[i, :n] = torch.tensor([*p, *a])
            labels[i, len(p) : n] = torch.tensor(a)  # the prompt teaches nothing
            mask[i, :n] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    with atomic_dir(out) as tmp:  # an interrupted run leaves no half adapter
        model.save_pretrained(tmp)
        adapter = tmp / "adapter_config.json"
        write_json(adapter, {**json.loads(adapter.read_text()), "base_model_name_or_path": name})
    return loss.item()


def plain_answers(model: Model, questions: list[str], run: RunSettings) -> list[str]:
    """The model's own answers to the bare questions, sampled as the run samples, with seeds
    apart from the ones screen uses for its baseline."""
    seeds = [10_000 + i for i in range(len(questions))]
    prompts = user_prompts(model, questions, run.experiment.prompt_style)
    gens = generate_batch(model, prompts, run.experiment.generation, seeds)
    return tokenizer_of(model).batch_decode([g.response_ids for g in gens],
                                            skip_special_tokens=True)  # fmt: skip


def table(exp: Experiment, layer: int) -> str:
    """The markdown table of ``--table`` (module docstring), one row per trait."""
    model = tx.load_model(exp.model)
    lines = [
        f"| trait (block {layer}) | AUROC, pos vs plain | mean, pos + plain | plain half "
        "| plain half, greedy baseline | AUROC, pos vs neg |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for trait in exp.traits:
        run = tx.settings_for(exp, trait, variant="instruction")
        vectors = tx.run_trait(run, get_model=lambda: model)
        rows = planted(run)
        pos = [r for r in rows if r["label"]]
        questions = [str(r["prompt"]) for r in pos]
        plain = [{"prompt": q, "response": t, "label": False}
                 for q, t in zip(questions, plain_answers(model, questions, run), strict=True)
                 if t.strip()]  # fmt: skip
        kw = {"layer": layer, "settings": run.experiment.generation, "batch_size": 16}
        vs_plain = tx.screen(model, vectors, pos + plain, **kw).traits[trait]
        greedy = GenerationSettings(max_new_tokens=run.experiment.generation.max_new_tokens,
                                    do_sample=False)  # fmt: skip
        plain_greedy = tx.screen(model, vectors, plain, **{**kw, "settings": greedy}).traits[trait]
        vs_neg = tx.screen(model, vectors, rows, **kw).traits[trait]
        lines.append(
            f"| {trait} | {vs_plain.auroc:.2f} | {vs_plain.mean:+.2f} "
            f"| {vs_plain.by_label()[False]:+.2f} | {plain_greedy.mean:+.2f} | {vs_neg.auroc:.2f} |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="smollm2_cognitive")
    parser.add_argument("--trait", default="local_global")
    parser.add_argument("--table", action="store_true", help="print the per-trait table")
    parser.add_argument("--layer", type=int, default=12, help="the block --table reads")
    args = parser.parse_args(argv)
    exp = tx.load_experiment(args.experiment)
    if args.table:
        print(table(exp, args.layer))
        return 0
    run = tx.settings_for(exp, args.trait, variant="instruction")
    tx.run_trait(run)  # cached: nothing to do when the instruction run exists
    out = run.out_dir.parent / "applications"
    rows = planted(run)
    write_text(out / "planted.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    n_pos = sum(bool(r["label"]) for r in rows)
    print(f"{out / 'planted.jsonl'}: {len(rows)} samples, {n_pos} under the positive instruction")
    for half, label in (("pos", True), ("neg", False)):
        adapter = out / f"lora-{half}"
        if (adapter / "adapter_config.json").exists():
            print(f"{adapter}: exists (delete it to train again)")
            continue
        rows_half = [r for r in rows if r["label"] is label]
        loss = train_lora(run.model, rows_half, adapter, exp.seed)
        print(f"{adapter}: LoRA r={RANK} on the {len(rows_half)} {half} samples, {STEPS} steps "
              f"of {BATCH}, last loss {loss:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
