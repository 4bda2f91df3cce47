"""Last step of the README demo: load the uploaded model back from the Hub and print a sample generation.

    python scripts/demo_load_back.py --repo-id demo/tiny-grpo-chain-sum [--revision step-30] [--save-card DIR]

The Hub is ``HF_ENDPOINT`` (the demo's local server), the token ``HF_TOKEN``. Without ``--revision`` the newest
``step-N`` tag is used, i.e. ``from_pretrained(repo_id, revision="step-N")`` exactly as the model card shows.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from huggingface_hub import HfApi
from transformers import AutoModelForCausalLM, AutoTokenizer


def newest_step_tag(repo_id: str) -> str:
    """The ``step-N`` tag with the largest N.

    Raises:
        SystemExit: the repo has no step tag (the upload did not happen).
    """
    tags = [t.name for t in HfApi().list_repo_refs(repo_id).tags if re.fullmatch(r"step-\d+", t.name)]
    if not tags:
        sys.exit(f"{repo_id} has no step-N tag: the upload did not happen (see the training log)")
    return max(tags, key=lambda t: int(t.split("-")[1]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo-id", required=True)
    p.add_argument("--revision", default=None, help="default: the newest step-N tag")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--save-card", default=None, help="download the model card and its curves PNG into this folder")
    args = p.parse_args(argv)

    revision = args.revision or newest_step_tag(args.repo_id)
    files = sorted(HfApi().list_repo_files(args.repo_id, revision=revision))
    print(f"{args.repo_id}@{revision}: {', '.join(files)}")
    tokenizer = AutoTokenizer.from_pretrained(args.repo_id, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(args.repo_id, revision=revision).eval()
    print(f"loaded with from_pretrained({args.repo_id!r}, revision={revision!r}): "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")

    import reasoning_gym
    from reasoning_gym.utils import SYSTEM_PROMPTS

    # the demo's task and prompt format (training/configs/cpu_demo.yaml: chain_sum, DeepSeekZero system prompt)
    item = reasoning_gym.create_dataset("chain_sum", size=1, seed=7, min_terms=2, max_terms=2, max_digits=1)[0]
    messages = [{"role": "system", "content": SYSTEM_PROMPTS["DeepSeekZero"]},
                {"role": "user", "content": item["question"]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) \
        if tokenizer.chat_template else item["question"]
    ids = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    completion = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"question: {item['question']}\nexpected: {item['answer']}\nmodel:    {completion!r}")
    if args.save_card:
        save_card(args.repo_id, revision, Path(args.save_card))


def save_card(repo_id: str, revision: str, out: Path) -> None:
    """Download the model card and the curves it shows, and print the card's ``## Results`` section."""
    from huggingface_hub import hf_hub_download

    out.mkdir(parents=True, exist_ok=True)
    files = HfApi().list_repo_files(repo_id, revision=revision)
    for name in ("README.md", "training_curves.png"):
        if name in files:
            hf_hub_download(repo_id, name, revision=revision, local_dir=out)
    card = (out / "README.md").read_text() if (out / "README.md").is_file() else ""
    results = card.split("## Results", 1)[1].split("\n## ", 1)[0] if "## Results" in card else ""
    print(f"model card of {repo_id}@{revision} (saved in {out}):\n## Results{results.rstrip()}" if results else
          f"the model card of {repo_id}@{revision} has no results section")


if __name__ == "__main__":
    main()
