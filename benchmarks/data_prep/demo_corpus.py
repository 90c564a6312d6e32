"""Deterministic generator of the shipped demo corpus and the small tokenizer trained on it.

The demo has to run offline on a laptop CPU in minutes, so the project ships its own data instead of
downloading a dataset: small Python functions with docstrings, built from templates over many operations,
names, argument names and implementation styles, and executed to produce correct test expectations. Four
tasks of clearly different size and difficulty come out of it, in task-id order:

``code_completion`` (largest; prompt/answer, plus some ``text`` records of whole functions),
``text_to_code`` (ChatML ``chat_rounds`` with a system turn, some with a second "add type hints" round),
``code_to_text`` (``instruction``/``output``: explain a function in one or two sentences) and
``unit_tests`` (small: write pytest asserts for a function; a model overfits it quickly, which is what a
balancer must notice).

``python benchmarks/data_prep/demo_corpus.py`` rewrites ``mftcoder_coba/demo_data/`` (the jsonl files
and ``tokenizer/``, a byte-level BPE with a ChatML chat template). Output is identical on every run.
"""
from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEMO_DIR = Path(__file__).resolve().parents[2] / "mftcoder_coba" / "demo_data"
TASK_SIZES = {"code_completion": 2400, "text_to_code": 900, "code_to_text": 600, "unit_tests": 120}
SEED = 20261124
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Argument kinds: (names to draw from, loop-variable names, type hint, example-input generator)
_KINDS: dict[str, tuple[list[str], list[str], str, Callable[[random.Random], Any]]] = {
    "ints": (["values", "nums", "numbers", "xs", "data"], ["v", "x", "n", "item"], "list[int]",
             lambda r: [r.randint(-9, 20) for _ in range(r.randint(2, 6))]),
    "text": (["text", "s", "word", "line"], ["ch", "c", "char"], "str",
             lambda r: r.choice(["level", "hello world", "abc", "noon", "python code", "a b c", "Data Set"])),
    "int": (["n", "num", "k"], ["i", "j"], "int", lambda r: r.randint(1, 12)),
    "strings": (["words", "strings", "names", "tokens"], ["w", "word", "name"], "list[str]",
                lambda r: r.sample(["apple", "kiwi", "fig", "banana", "plum", "cherry", "lime"], r.randint(2, 5))),
    "number": (["celsius", "temp", "degrees"], ["t"], "float", lambda r: r.choice([0, 10, 25, 37, 100, -40])),
}


@dataclass(frozen=True)
class Op:
    """One operation: function names, argument kinds, docstring summary, implementations and return type."""

    key: str
    names: tuple[str, ...]
    args: tuple[str, ...]
    doc: str
    bodies: tuple[tuple[str, str], ...]  # (style phrase for explanations, code with {a} {b} {v} {k})
    returns: str


def _op(key: str, names: str, args: str, doc: str, returns: str, *bodies: tuple[str, str]) -> Op:
    return Op(key, tuple(names.split()), tuple(args.split()), doc, bodies, returns)


LOOP = "a simple loop"
OPS: tuple[Op, ...] = (
    _op("sum", "total sum_values add_all", "ints", "Return the sum of the numbers in {a}.", "int",
        (LOOP, "result = 0\nfor {v} in {a}:\n    result += {v}\nreturn result"),
        ("the built-in sum", "return sum({a})")),
    _op("product", "product multiply_all prod_of", "ints", "Return the product of the numbers in {a}.", "int",
        (LOOP, "result = 1\nfor {v} in {a}:\n    result *= {v}\nreturn result")),
    _op("max", "largest max_value biggest", "ints", "Return the largest number in {a}.", "int",
        (LOOP, "best = {a}[0]\nfor {v} in {a}[1:]:\n    if {v} > best:\n        best = {v}\nreturn best"),
        ("the built-in max", "return max({a})")),
    _op("min", "smallest min_value lowest", "ints", "Return the smallest number in {a}.", "int",
        (LOOP, "best = {a}[0]\nfor {v} in {a}[1:]:\n    if {v} < best:\n        best = {v}\nreturn best"),
        ("the built-in min", "return min({a})")),
    _op("mean", "mean average avg", "ints", "Return the arithmetic mean of the numbers in {a}.", "float",
        ("sum and len", "return sum({a}) / len({a})"),
        (LOOP, "total = 0\nfor {v} in {a}:\n    total += {v}\nreturn total / len({a})")),
    _op("count_even", "count_even num_even even_count", "ints", "Count the even numbers in {a}.", "int",
        (LOOP, "count = 0\nfor {v} in {a}:\n    if {v} % 2 == 0:\n        count += 1\nreturn count"),
        ("a generator expression", "return sum(1 for {v} in {a} if {v} % 2 == 0)")),
    _op("count_odd", "count_odd num_odd odd_count", "ints", "Count the odd numbers in {a}.", "int",
        (LOOP, "count = 0\nfor {v} in {a}:\n    if {v} % 2 == 1:\n        count += 1\nreturn count"),
        ("a generator expression", "return sum(1 for {v} in {a} if {v} % 2 == 1)")),
    _op("count_above", "count_above_{k} num_above_{k} count_greater_{k}", "ints",
        "Count how many numbers in {a} are greater than {k}.", "int",
        (LOOP, "count = 0\nfor {v} in {a}:\n    if {v} > {k}:\n        count += 1\nreturn count"),
        ("a generator expression", "return sum(1 for {v} in {a} if {v} > {k})")),
    _op("positives", "positives keep_positive only_positive", "ints",
        "Return the numbers in {a} that are greater than zero, in order.", "list[int]",
        ("a list comprehension", "return [{v} for {v} in {a} if {v} > 0]"),
        (LOOP, "result = []\nfor {v} in {a}:\n    if {v} > 0:\n        result.append({v})\nreturn result")),
    _op("evens", "evens keep_even only_even", "ints", "Return the even numbers in {a}, in order.", "list[int]",
        ("a list comprehension", "return [{v} for {v} in {a} if {v} % 2 == 0]"),
        (LOOP, "result = []\nfor {v} in {a}:\n    if {v} % 2 == 0:\n        result.append({v})\nreturn result")),
    _op("squares", "squares square_all squared", "ints", "Return the square of every number in {a}.", "list[int]",
        ("a list comprehension", "return [{v} * {v} for {v} in {a}]"),
        (LOOP, "result = []\nfor {v} in {a}:\n    result.append({v} * {v})\nreturn result")),
    _op("scale", "times_{k} scale_by_{k} multiply_by_{k}", "ints", "Return every number in {a} multiplied by {k}.",
        "list[int]", ("a list comprehension", "return [{v} * {k} for {v} in {a}]"),
        (LOOP, "result = []\nfor {v} in {a}:\n    result.append({v} * {k})\nreturn result")),
    _op("shift", "add_{k} plus_{k} shift_by_{k}", "ints", "Return every number in {a} increased by {k}.",
        "list[int]", ("a list comprehension", "return [{v} + {k} for {v} in {a}]"),
        ("map with a lambda", "return list(map(lambda {v}: {v} + {k}, {a}))")),
    _op("negate", "negate negated flip_signs", "ints", "Return the negation of every number in {a}.", "list[int]",
        ("a list comprehension", "return [-{v} for {v} in {a}]")),
    _op("running_sum", "running_sum cumulative_sum prefix_sums", "ints",
        "Return the running totals of {a}: element i is the sum of the first i + 1 numbers.", "list[int]",
        (LOOP, "result = []\ntotal = 0\nfor {v} in {a}:\n    total += {v}\n    result.append(total)\nreturn result")),
    _op("differences", "differences deltas pairwise_diff", "ints",
        "Return the differences between consecutive numbers in {a}.", "list[int]",
        ("zip over neighbours", "return [b - a for a, b in zip({a}, {a}[1:])]"),
        ("an index loop", "return [{a}[i + 1] - {a}[i] for i in range(len({a}) - 1)]")),
    _op("reverse_list", "reversed_list reverse_items backwards", "ints", "Return the numbers of {a} in reverse order.",
        "list[int]", ("slicing", "return {a}[::-1]"),
        (LOOP, "result = []\nfor {v} in {a}:\n    result.insert(0, {v})\nreturn result")),
    _op("unique", "unique dedupe distinct", "ints",
        "Return the numbers of {a} without duplicates, keeping the first occurrence of each.", "list[int]",
        ("a set of seen values", "seen = set()\nresult = []\nfor {v} in {a}:\n    if {v} not in seen:\n"
         "        seen.add({v})\n        result.append({v})\nreturn result")),
    _op("argmax", "argmax index_of_max position_of_largest", "ints",
        "Return the index of the largest number in {a} (the first one on ties).", "int",
        (LOOP, "best = 0\nfor i in range(1, len({a})):\n    if {a}[i] > {a}[best]:\n        best = i\nreturn best"),
        ("max over indices", "return max(range(len({a})), key=lambda i: ({a}[i], -i))")),
    _op("sum_squares", "sum_of_squares square_sum energy", "ints", "Return the sum of the squares of {a}.", "int",
        ("a generator expression", "return sum({v} * {v} for {v} in {a})"),
        (LOOP, "total = 0\nfor {v} in {a}:\n    total += {v} ** 2\nreturn total")),
    _op("all_positive", "all_positive every_positive is_all_positive", "ints",
        "Return True if every number in {a} is greater than zero.", "bool",
        ("the built-in all", "return all({v} > 0 for {v} in {a})"),
        (LOOP, "for {v} in {a}:\n    if {v} <= 0:\n        return False\nreturn True")),
    _op("contains", "has_{k} contains_{k} includes_{k}", "ints", "Return True if {k} occurs in {a}.", "bool",
        ("the in operator", "return {k} in {a}"),
        (LOOP, "for {v} in {a}:\n    if {v} == {k}:\n        return True\nreturn False")),
    _op("reverse_text", "reverse_string reversed_text mirror", "text", "Return {a} with its characters reversed.",
        "str", ("slicing", "return {a}[::-1]"),
        (LOOP, "result = ''\nfor {v} in {a}:\n    result = {v} + result\nreturn result")),
    _op("vowels", "count_vowels vowel_count num_vowels", "text", "Count the vowels (a, e, i, o, u) in {a}.", "int",
        ("a generator expression", "return sum(1 for {v} in {a}.lower() if {v} in 'aeiou')"),
        (LOOP, "count = 0\nfor {v} in {a}.lower():\n    if {v} in 'aeiou':\n        count += 1\nreturn count")),
    _op("palindrome", "is_palindrome palindrome reads_same_backwards", "text",
        "Return True if {a} reads the same forwards and backwards.", "bool",
        ("slicing", "return {a} == {a}[::-1]"),
        ("two indices moving inwards", "i, j = 0, len({a}) - 1\nwhile i < j:\n    if {a}[i] != {a}[j]:\n"
         "        return False\n    i += 1\n    j -= 1\nreturn True")),
    _op("shout", "shout to_upper upper_case", "text", "Return {a} in upper case.", "str",
        ("str.upper", "return {a}.upper()")),
    _op("no_spaces", "remove_spaces strip_spaces no_spaces", "text", "Return {a} with every space removed.", "str",
        ("str.replace", "return {a}.replace(' ', '')"),
        ("a generator expression", "return ''.join({v} for {v} in {a} if {v} != ' ')")),
    _op("title", "title_words capitalize_words headline", "text",
        "Return {a} with the first letter of every word in upper case.", "str",
        ("split and join", "return ' '.join(w.capitalize() for w in {a}.split())")),
    _op("word_count", "word_count count_words num_words", "text", "Count the words in {a}, split on whitespace.",
        "int", ("str.split", "return len({a}.split())")),
    _op("first_letters", "initials first_letters acronym", "text",
        "Return the first letter of every word in {a}, joined together.", "str",
        ("split and join", "return ''.join(w[0] for w in {a}.split())")),
    _op("factorial", "factorial fact product_to_n", "int", "Return {a} factorial, the product of 1 to {a}.", "int",
        (LOOP, "result = 1\nfor {v} in range(2, {a} + 1):\n    result *= {v}\nreturn result"),
        ("recursion", "if {a} <= 1:\n    return 1\nreturn {a} * {f}({a} - 1)")),
    _op("fibonacci", "fibonacci fib nth_fibonacci", "int",
        "Return the {a}-th Fibonacci number, counting fib(0) = 0 and fib(1) = 1.", "int",
        ("two running values", "a, b = 0, 1\nfor _ in range({a}):\n    a, b = b, a + b\nreturn a")),
    _op("is_prime", "is_prime prime check_prime", "int", "Return True if {a} is a prime number.", "bool",
        ("trial division up to the square root", "if {a} < 2:\n    return False\n{v} = 2\nwhile {v} * {v} <= {a}:\n"
         "    if {a} % {v} == 0:\n        return False\n    {v} += 1\nreturn True")),
    _op("digit_sum", "digit_sum sum_digits digits_total", "int", "Return the sum of the decimal digits of {a}.",
        "int", ("a string conversion", "return sum(int(d) for d in str({a}))"),
        ("integer division", "total = 0\nwhile {a} > 0:\n    total += {a} % 10\n    {a} //= 10\nreturn total")),
    _op("triangular", "triangular sum_to_n sum_upto", "int", "Return the sum of the integers from 1 to {a}.", "int",
        ("the closed formula", "return {a} * ({a} + 1) // 2"),
        (LOOP, "total = 0\nfor {v} in range(1, {a} + 1):\n    total += {v}\nreturn total")),
    _op("gcd", "gcd greatest_common_divisor common_divisor", "int int",
        "Return the greatest common divisor of {a} and {b}.", "int",
        ("Euclid's algorithm", "while {b}:\n    {a}, {b} = {b}, {a} % {b}\nreturn {a}")),
    _op("fahrenheit", "to_fahrenheit celsius_to_fahrenheit c_to_f", "number",
        "Convert the temperature {a} from Celsius to Fahrenheit.", "float",
        ("the conversion formula", "return {a} * 9 / 5 + 32")),
    _op("frequencies", "word_frequencies count_each tally", "strings",
        "Return a dict mapping each string in {a} to how often it occurs.", "dict[str, int]",
        (LOOP, "counts = {{}}\nfor {v} in {a}:\n    counts[{v}] = counts.get({v}, 0) + 1\nreturn counts")),
    _op("longest", "longest longest_string longest_word", "strings",
        "Return the longest string in {a} (the first one on ties).", "str",
        ("the built-in max with a key", "return max({a}, key=len)"),
        (LOOP, "best = {a}[0]\nfor {v} in {a}[1:]:\n    if len({v}) > len(best):\n        best = {v}\nreturn best")),
    _op("lengths", "lengths string_lengths sizes", "strings", "Return the length of every string in {a}.",
        "list[int]", ("a list comprehension", "return [len({v}) for {v} in {a}]")),
    _op("join", "join_commas comma_separated to_csv", "strings",
        "Return the strings in {a} joined with a comma and a space.", "str", ("str.join", "return ', '.join({a})")),
    _op("sorted_words", "sorted_words alphabetical sort_strings", "strings",
        "Return the strings in {a} sorted alphabetically.", "list[str]", ("the built-in sorted", "return sorted({a})")),
)


@dataclass
class Function:
    """One generated function: its source (with and without type hints) and how it can be called."""

    op: Op
    name: str
    params: list[str]
    kinds: list[str]
    style: str
    source: str
    typed_source: str
    signature: str
    summary: str
    body: str
    k: int


def _indent(code: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line if line else line for line in code.splitlines())


def make_function(rng: random.Random) -> Function:
    """Draw an operation, names and an implementation style; the result is valid, runnable Python."""
    op = rng.choice(OPS)
    k = rng.randint(2, 9)
    name = rng.choice(op.names).format(k=k)
    params: list[str] = []
    for kind in op.args:
        pool = [n for n in _KINDS[kind][0] if n not in params]
        params.append(rng.choice(pool) if kind != "int" or len(op.args) == 1 else ("a", "b")[len(params)])
    loop_pool = [n for n in _KINDS[op.args[0]][1] if n not in params]
    fields = {"a": params[0], "b": params[-1], "v": rng.choice(loop_pool), "k": k, "f": name}
    style, template = rng.choice(op.bodies)
    body = template.format(**fields)
    summary = op.doc.format(**fields)
    signature = f"def {name}({', '.join(params)}):"
    hints = ", ".join(f"{p}: {_KINDS[kind][2]}" for p, kind in zip(params, op.args))
    typed_signature = f"def {name}({hints}) -> {op.returns}:"
    source = f"{signature}\n{_indent(body)}\n"
    typed_source = f'{typed_signature}\n    """{summary}"""\n{_indent(body)}\n'
    return Function(op, name, params, list(op.args), style, source, typed_source, signature, summary, body, k)


def documented(fn: Function) -> str:
    return f'{fn.signature}\n    """{fn.summary}"""\n{_indent(fn.body)}\n'


def _call_examples(fn: Function, rng: random.Random, count: int) -> list[tuple[str, Any]]:
    """Run the generated function on drawn inputs and return ``(call source, result)`` pairs."""
    namespace: dict[str, Any] = {}
    exec(compile(fn.source, f"<demo {fn.name}>", "exec"), namespace)  # noqa: S102 - our own generated code
    examples: list[tuple[str, Any]] = []
    for _ in range(count * 3):
        inputs = [_KINDS[kind][3](rng) for kind in fn.kinds]
        call = f"{fn.name}({', '.join(repr(x) for x in inputs)})"
        if call in (c for c, _ in examples):
            continue
        examples.append((call, namespace[fn.name](*[list(x) if isinstance(x, list) else x for x in inputs])))
        if len(examples) == count:
            break
    return examples


SYSTEMS = (
    "You are a careful Python programmer. Answer with code only.",
    "You write short, correct Python functions.",
)
ASKS = ("Write a Python function `{sig}` that does the following: {doc}", "Implement `{sig}`. {doc}",
        "Python: {doc} Name the function `{name}`.")
EXPLAIN = ("Explain what this function does.", "What does the following code do?", "Summarise this function.")


def _completion(fn: Function, rng: random.Random) -> dict[str, Any]:
    if rng.random() < 0.15:
        return {"text": documented(fn)}
    return {"prompt": f'{fn.signature}\n    """{fn.summary}"""\n', "answer": _indent(fn.body) + "\n"}


def _text_to_code(fn: Function, rng: random.Random) -> dict[str, Any]:
    ask = rng.choice(ASKS).format(sig=fn.signature[4:-1], doc=fn.summary, name=fn.name)
    rounds = [{"role": "system", "content": rng.choice(SYSTEMS)}, {"role": "human", "content": ask},
              {"role": "bot", "content": fn.source}]
    if rng.random() < 0.25:
        rounds += [{"role": "human", "content": "Now add type hints and a docstring."},
                   {"role": "bot", "content": fn.typed_source}]
    return {"chat_rounds": rounds}


def _code_to_text(fn: Function, rng: random.Random) -> dict[str, Any]:
    uses = f"It uses {fn.style}."
    return {"instruction": rng.choice(EXPLAIN), "input": fn.source, "output": f"{fn.summary} {uses}"}


def _unit_tests(fn: Function, rng: random.Random) -> dict[str, Any]:
    lines = [f"def test_{fn.name}():"]
    lines += [f"    assert {call} == {result!r}" for call, result in _call_examples(fn, rng, 3)]
    return {"chat_rounds": [{"role": "user", "content": f"Write pytest tests for:\n{fn.source}"},
                            {"role": "assistant", "content": "\n".join(lines) + "\n"}]}


BUILDERS = {"code_completion": _completion, "text_to_code": _text_to_code, "code_to_text": _code_to_text,
            "unit_tests": _unit_tests}


def generate(sizes: dict[str, int] = TASK_SIZES, seed: int = SEED) -> dict[str, list[dict[str, Any]]]:
    """Records per task; no two records of a task are equal, and functions are not shared across tasks."""
    rng = random.Random(seed)
    seen: set[str] = set()
    corpus: dict[str, list[dict[str, Any]]] = {}
    for task, size in sizes.items():
        records: list[dict[str, Any]] = []
        while len(records) < size:
            fn = make_function(rng)
            if fn.source in seen:
                continue
            seen.add(fn.source)
            records.append(BUILDERS[task](fn, rng))
        corpus[task] = records
    return corpus


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """Byte-level BPE with ChatML specials, saved as a transformers tokenizer directory with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"], model_max_length=4096)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    # A config every transformers version since 4.4x reads the same way: the class by its long-standing name,
    # the chat template inline, and the extra special token in the list form.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "additional_special_tokens": ["<|im_start|>"], "model_max_length": 4096, "chat_template": CHAT_TEMPLATE}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for extra in ("chat_template.jinja", "special_tokens_map.json"):
        (out_dir / extra).unlink(missing_ok=True)


def _record_texts(record: dict[str, Any]) -> list[str]:
    if "chat_rounds" in record:
        return [r["content"] for r in record["chat_rounds"]]
    return [v for v in record.values() if isinstance(v, str)]


def write_demo(out_dir: Path = DEMO_DIR, tokenizer: bool = True) -> None:
    corpus = generate()
    out_dir.mkdir(parents=True, exist_ok=True)
    for task, records in corpus.items():
        with open(out_dir / f"{task}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    if tokenizer:
        texts = [t for records in corpus.values() for r in records for t in _record_texts(r)]
        train_tokenizer(texts, out_dir / "tokenizer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEMO_DIR)
    parser.add_argument("--no-tokenizer", action="store_true", help="only rewrite the jsonl files")
    args = parser.parse_args()
    write_demo(args.out, tokenizer=not args.no_tokenizer)


if __name__ == "__main__":
    main()
