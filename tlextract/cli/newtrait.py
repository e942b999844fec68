"""``new-trait NAME --description "..."``: draft a complete trait with an OpenAI-compatible chat
model (:mod:`tlextract.judge.draft`), preview it, and write it into the experiment's trait folder.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from tlextract.cli.options import EXPERIMENT, EXPERIMENTS_DIR, MODEL, Group, option
from tlextract.config import ENDPOINT, Experiment
from tlextract.errors import TLExtractError
from tlextract.judge.chat import ChatEndpoint
from tlextract.judge.draft import DEFAULT_NATURAL, DRAFT_TIMEOUT, check_destination, draft_trait
from tlextract.traits import Trait

NEW_TRAIT: Group = (
    option("name", help="the trait's directory name, e.g. local_global"),
    option("--description", required=True, help="what the trait is: both poles, plainly"),
    EXPERIMENT.but(help="whose trait folder receives the trait (it is not added to its "
                   '"traits"; do that once you have reviewed it)'),
    EXPERIMENTS_DIR,
    option("--base-url", default=None,
           help="the chat endpoint (default: the experiment's openai judge)"),
    MODEL.but(help="the chat model (default: the judge's)"),
    option("--api-key-env", default=None,
           help="environment variable holding the API key (default: the judge's, else "
           "OPENAI_API_KEY; '' sends no key)"),
    option("--n-natural", type=int, default=DEFAULT_NATURAL,
           help=f"natural prompt pairs (default {DEFAULT_NATURAL})"),
    option("--force", parameter="force", action="store_true",
           help="replace an existing trait's files (its run outputs are kept)"),
    option("--yes", "-y", action="store_true", help="write after the preview without asking"),
)  # fmt: skip


def _endpoint(args: argparse.Namespace, experiment: Experiment) -> ChatEndpoint:
    """Flags first, then the experiment's judge block when it is an "openai" one."""
    judge = experiment.judge if experiment.judge.get("kind") == "openai" else {}
    base_url = args.base_url or judge.get("base_url")
    model = args.model or judge.get("model")
    if not base_url or not model:
        missing = [
            flag for flag, value in (("--base-url", base_url), ("--model", model)) if not value
        ]
        raise TLExtractError(
            f"no chat model to draft with: pass {' and '.join(missing)}, or give "
            f'{experiment.config_path} an "openai" judge block.'
        )
    key_env = args.api_key_env
    if key_env is None:
        key_env = judge.get("api_key_env", ENDPOINT.api_key_env)  # the judge's own default
    return ChatEndpoint(base_url, model, key_env or None, timeout=DRAFT_TIMEOUT, max_retries=3,
                        role="drafting", no_key_hint="pass --api-key-env ''")  # fmt: skip


def _indented(text: str, prefix: str = "    ") -> list[str]:
    return textwrap.indent(text, prefix, lambda line: True).splitlines()


def preview(trait: Trait, name: str) -> list[str]:
    """What to look at before the trait is written: a sample of every part."""
    natural = trait.natural or {"pos": (), "neg": ()}
    lines = [f"draft of trait '{name}' (it passes validation):", "  description:"]
    lines += _indented(trait.description)
    lines.append(f"  instruction pairs (2 of {len(trait.instructions)}):")
    for pair in trait.instructions[:2]:
        lines += [f"    + {pair.pos}", f"    - {pair.neg}"]
    lines.append(f"  questions (3 of {len(trait.questions)}):")
    lines += [f"    {q}" for q in trait.questions[:3]]
    lines.append("  eval_prompt:")
    lines += _indented(trait.eval_prompt)
    lines.append(f"  natural prompt pairs (3 of {len(natural['pos'])}):")
    for pos, neg in list(zip(natural["pos"], natural["neg"], strict=True))[:3]:
        lines += [f"    + {pos}", f"    - {neg}"]
    return lines


def _review(name: str, dest: Path, ask: bool) -> Callable[[Trait], None]:
    def review(trait: Trait) -> None:
        print("\n".join(preview(trait, name)), flush=True)
        if ask:
            try:
                answer = input(f"write it to {dest}? [y/N] ")
            except EOFError:
                answer = ""
            if answer.strip().lower() not in ("y", "yes"):
                raise TLExtractError(f"not confirmed; nothing written to {dest}.")

    return review


def new_trait(args: argparse.Namespace, experiment: Experiment) -> int:
    """The command: every input checked before the first request, then draft, preview, write."""
    dest = check_destination(experiment.traits_dir, args.name, args.force)
    if not args.yes and not (sys.stdin and sys.stdin.isatty()):
        raise TLExtractError("stdin is not a terminal to confirm on; pass --yes to write the "
                             "trait after the preview without asking.")  # fmt: skip
    endpoint = _endpoint(args, experiment)
    draft_trait(endpoint, experiment.traits_dir, args.name, args.description, args.n_natural,
                args.force, _review(args.name, dest, ask=not args.yes))  # fmt: skip
    print(f"wrote {dest}; review it, then add '{args.name}' to \"traits\" in "
          f"{experiment.config_path} to run it.")  # fmt: skip
    return 0
