"""EvoPrompt: selection, replacement, templates and reply parsing, the cached scorer, the LLM operator against a
scripted loopback endpoint, and whole runs (search improves fitness, resume equals an uninterrupted run)."""

import asyncio
import collections
import functools
import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from openai_server import OpenAIServer  # noqa: E402

from pipeline import evoprompt  # noqa: E402
from pipeline.config import RecipeError  # noqa: E402
from pipeline.evo.operators import (DE_TEMPLATE, GA_TEMPLATE, LexicalOperator, LLMOperator, fill,  # noqa: E402
                                    parse_reply, phrases)
from pipeline.evo.search import (Candidate, Scorer, de_generation, de_replace, ga_generation, ga_keep,  # noqa: E402
                                 metric_value, roulette_pair, roulette_probabilities, rouge_l)
from pipeline.generation.teachers import OpenAITeacher, RequestCache  # noqa: E402
from pipeline.tasks import Example, get_task, make_split  # noqa: E402

BANK = ["Think step by step.", "Be friendly.", "Take a deep breath.", "Use plain language."]


def cand(prompt, score, gen=0):
    return Candidate(prompt, score, gen, "initial")


# ---------------------------------------------------------------------------------------------
# Selection and replacement
# ---------------------------------------------------------------------------------------------


def test_roulette_probabilities_and_draws():
    assert roulette_probabilities([1.0, 3.0]) == [0.25, 0.75]
    assert roulette_probabilities([0.0, 0.0, 0.0]) == [1 / 3] * 3
    with pytest.raises(ValueError):
        roulette_probabilities([0.5, -0.1])
    rng, firsts, pairs = random.Random(0), collections.Counter(), collections.Counter()
    for _ in range(4000):
        a, b = roulette_pair([1.0, 0.0, 3.0], rng)
        assert a != b
        firsts[a] += 1
        pairs[(a, b)] += 1
    assert firsts[1] == 0  # a zero-fitness prompt is never drawn first
    assert abs(firsts[2] / 4000 - 0.75) < 0.03 and abs(firsts[0] / 4000 - 0.25) < 0.03
    # Second parent among the rest, again by fitness: after 0 only 2 has weight, after 2 only 0.
    assert set(pairs) == {(0, 2), (2, 0)}
    # All others zero: the second parent is drawn uniformly among them.
    seconds = collections.Counter(roulette_pair([1.0, 0.0, 0.0], rng)[1] for _ in range(2000))
    assert seconds[0] == 0 and abs(seconds[1] - seconds[2]) < 200


def test_ga_keeps_top_n_of_parents_and_children():
    parents = [cand("a", 0.5), cand("b", 0.2), cand("c", 0.4)]
    children = [cand("d", 0.9, 1), cand("a", 0.99, 1), cand("e", 0.4, 1), cand("f", 0.1, 1)]
    kept = ga_keep(parents, children, 3)
    # The repeat of "a" is dropped (its parent copy stays), ties keep the parent ("c" before "e").
    assert [c.prompt for c in kept] == ["d", "a", "c"]
    assert kept[1].score == 0.5


def test_de_replaces_only_when_strictly_better():
    member = cand("m", 0.5)
    pop = [member, cand("x", 0.7)]
    assert de_replace(member, cand("better", 0.6, 1), pop).prompt == "better"
    assert de_replace(member, cand("tie", 0.5, 1), pop) is member
    assert de_replace(member, cand("worse", 0.1, 1), pop) is member
    assert de_replace(member, None, pop) is member
    assert de_replace(member, cand("x", 0.9, 1), pop) is member  # already in the population


# ---------------------------------------------------------------------------------------------
# Templates and reply parsing
# ---------------------------------------------------------------------------------------------


def test_template_filling():
    text = fill(GA_TEMPLATE, prompt1="Use {braces} here.", prompt2="Second one.")
    assert "Prompt 1: Use {braces} here.\nPrompt 2: Second one." in text
    assert text.count("<prompt>") == 3  # the demo's answer plus the two instructions that name the tags
    text = fill(DE_TEMPLATE, donor1="D1", donor2="D2", best="B", member="M")
    assert "Prompt 1: D1\nPrompt 2: D2" in text and "Prompt 3: B" in text and "Basic prompt: M" in text
    with pytest.raises(KeyError):
        fill(GA_TEMPLATE, prompt1="only one")
    with pytest.raises(KeyError):
        fill(GA_TEMPLATE, prompt1="a", prompt2="b", best="no such field")


@pytest.mark.parametrize("reply,expected", [
    ("1. Crossover: x\n2. <prompt>Think  step\nby step.</prompt>", "Think step by step."),
    ("<prompt>first</prompt> then <PROMPT>last</PROMPT>", "last"),
    ("no tags at all", None),
    ("<prompt>never closed", None),
    ("<prompt>   </prompt>", None),
    ("<prompt>a <prompt>nested</prompt>", None),
    ("<prompt>Prompt 1: {prompt1}</prompt>", None),
    ("<prompt>" + "x" * 2000 + "</prompt>", None),
    ("", None),
    (None, None),
])
def test_reply_parsing(reply, expected):
    assert parse_reply(reply) == expected


# ---------------------------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------------------------


def test_lexical_operator_is_deterministic_and_uses_parents_and_bank():
    op = LexicalOperator(BANK, seed=3, mutation_rate=0.3)
    a, b = "Be brief. Answer now.", "Explain it. Check it. Answer now."
    kids = op.ga([(a, b)] * 20, generation=1)
    assert kids == LexicalOperator(BANK, seed=3, mutation_rate=0.3).ga([(a, b)] * 20, generation=1)
    assert len(set(kids)) > 5  # job index feeds the randomness
    allowed = set(phrases(a)) | set(phrases(b)) | set(BANK)
    for k in kids:
        assert k and set(phrases(k)) <= allowed
    de_kids = op.de([("Member one.", "Shared. Donor A.", "Shared. Donor B.", "Best one. Best two.")] * 20, 2)
    for k in de_kids:
        # The donors' shared sentence is never used: only where they differ is taken (then mutated).
        assert "Shared." not in k
        assert set(phrases(k)) <= {"Member one.", "Donor A.", "Donor B.", "Best one.", "Best two."} | set(BANK)
    assert op.paraphrase(["One. Two."], 0) == LexicalOperator(BANK, 3, 0.3).paraphrase(["One. Two."], 0)


def test_lexical_ga_children_keep_their_parents_length_and_differ_from_them():
    # A small task model reads short prompts best; children of one-sentence parents used to be both joined.
    op = LexicalOperator(BANK, seed=0, mutation_rate=0.3)
    kids = op.ga([("Answer the question.", "Be brief.")] * 200, generation=1)
    lengths = collections.Counter(len(phrases(k)) for k in kids)
    assert set(lengths) <= {1, 2} and lengths[1] > 60  # one insertion at most; many stay one sentence
    assert not {"Answer the question.", "Be brief."} & set(kids)  # a copy of a parent is drawn again
    assert {k for k in kids if len(phrases(k)) == 1} >= set(BANK)  # a one-sentence child is a mutated sentence


def scripted_operator(body):
    """A scripted LLM operator: answers GA/DE/paraphrase templates; a prompt containing BROKEN gets no tags."""
    text = body["messages"][-1]["content"]
    tail = text.split("Follow the")[-1]
    if "Basic prompt:" in tail:
        fields = [line.split(": ", 1)[1] for line in tail.splitlines()
                  if line.startswith(("Prompt 1:", "Prompt 2:", "Prompt 3:", "Basic prompt:"))]
        child = "DE(" + "|".join(fields) + ")"
    elif "Instruction:" in text:
        child = "PARA(" + text.split("Instruction: ")[1].strip() + ")"
    else:
        fields = [line.split(": ", 1)[1] for line in tail.splitlines() if line.startswith(("Prompt 1:", "Prompt 2:"))]
        child = "GA(" + "|".join(fields) + ")"
    return "I will do it." if "BROKEN" in child else f"1. Crossover prompt: ...\n2. <prompt>{child}</prompt>"


def test_llm_operator_against_loopback_endpoint(tmp_path):
    pop = [cand("alpha", 0.9), cand("beta", 0.5), cand("gamma", 0.3), cand("BROKEN", 0.1)]
    with OpenAIServer(reply=scripted_operator, faults={"500": 0.2}, seed=1) as server:
        teacher = OpenAITeacher(base_url=server.base_url, model="op", temperature=0.5, backoff_s=0.01)
        op = LLMOperator(teacher, RequestCache(tmp_path / "op.jsonl"), seed=0)
        score = lambda texts: [0.0 if "BROKEN" in t else 1.0 for t in texts]  # noqa: E731
        new, children = ga_generation(pop, op, score, 1, random.Random(0))
        ga_bodies = [b for b in server.bodies if "Cross over the following two prompts" in b["messages"][0]["content"]]
        assert ga_bodies and all(b["temperature"] == 0.5 for b in ga_bodies)
        for c in children:  # each child is the parsed reply to a template filled with exactly its parents
            a, b = (next(p.prompt for p in pop if p.id == i) for i in c.parents)
            assert c.prompt == f"GA({a}|{b})" and c.origin == "ga" and c.generation == 1
        assert not any("BROKEN" in c.prompt for c in children) and op.malformed == 4 - len(children)  # the pairs with BROKEN got no child
        assert len(new) == 4 and all(c.score == 1.0 for c in new[:len(children)])

        server.bodies.clear()
        new, children = de_generation(pop, op, score, 2, random.Random(0))
        sent = {b["messages"][0]["content"] for b in server.bodies}
        assert len(sent) == 4 and all("Basic prompt:" in t for t in sent)  # one call per member
        for c in children:
            member, d1, d2, best = (next(p.prompt for p in pop if p.id == i) for i in c.parents)
            assert best == "alpha" and member not in (d1, d2) and d1 != d2
            assert c.prompt == f"DE({d1}|{d2}|{best}|{member})"
        replaced = [n for n, o in zip(new, pop) if n is not o]
        assert all(n.origin == "de" for n in replaced)
        requests_before = server.stats["requests"]
        # Same generation again: every reply comes from the operator cache, nothing is sent.
        again, _ = de_generation(pop, op, score, 2, random.Random(0))
        assert [c.prompt for c in again] == [c.prompt for c in new]
        assert server.stats["requests"] == requests_before


# ---------------------------------------------------------------------------------------------
# Scorer
# ---------------------------------------------------------------------------------------------


class CountingModel:
    identity = "counting"

    def __init__(self):
        self.asked = []

    async def complete(self, requests, done):
        for r in requests:
            self.asked.append(r.key)
            system = r.messages[0]["content"]
            done(r, f"Answer: {r.example.answer}" if "good" in system else "Answer: nope")
        await asyncio.sleep(0)


def test_scorer_caches_per_prompt_and_example(tmp_path):
    examples = make_split(get_task("add"), "dev", 5)
    model = CountingModel()
    scorer = Scorer(model, RequestCache(tmp_path / "s.jsonl"))
    assert scorer.scores(["good prompt", "bad prompt", "good prompt"], examples) == [1.0, 0.0, 1.0]
    assert len(model.asked) == 10 and scorer.misses == 10 and scorer.hits == 0
    assert scorer.scores(["bad prompt", "new good"], examples) == [0.0, 1.0]
    assert len(model.asked) == 15 and scorer.hits == 5
    # A fresh scorer on the same cache file (a resumed run) asks for nothing it has.
    scorer2 = Scorer(CountingModel(), RequestCache(tmp_path / "s.jsonl"))
    assert scorer2.scores(["good prompt", "new good"], examples) == [1.0, 1.0]
    assert scorer2.task_model.asked == [] and scorer2.hits == 10


def test_metrics():
    ex = Example("add", "Add 1 + 2.", "3")
    assert rouge_l("the cat sat", "the cat sat") == 1.0 and rouge_l("a b", "c d") == 0.0
    assert abs(rouge_l("the cat", "the cat sat down") - 2 * (1 * 0.5) / 1.5) < 1e-9
    assert metric_value("exact_match", ex, "Answer: 3") == 1.0 and metric_value("exact_match", ex, " 3. ") == 1.0
    assert metric_value("verifier", ex, "3") == 0.0 and metric_value("verifier", ex, "x\nAnswer: 3") == 1.0


# ---------------------------------------------------------------------------------------------
# Whole runs against a scripted task model on loopback
# ---------------------------------------------------------------------------------------------

ANSWERS = {e.question: e.answer for t in ("add", "sort") for s in ("dev", "test") for e in make_split(get_task(t), s, 6)}


def scripted_task_model(body):
    """Right on every question when told to think step by step; right on some when asked to be brief."""
    system = next((m["content"] for m in body["messages"] if m["role"] == "system"), "")
    question = body["messages"][-1]["content"]
    good = "Think step by step." in system or ("brief" in system and len(question) % 2 == 0)
    return f"Answer: {ANSWERS[question]}" if good else "Answer: 0"


def write_inputs(tmp_path):
    (tmp_path / "init.yaml").write_text('prompts: ["You are a helpful assistant.", "Be brief.", "Answer it.", '
                                        '"Be brief. Be kind."]\n')
    (tmp_path / "bank.yaml").write_text("phrases:\n" + "".join(f'  - "{p}"\n' for p in BANK))


def argv(tmp_path, server, out, **over):
    args = {"output_dir": str(out), "initial_prompts": str(tmp_path / "init.yaml"),
            "operator": json.dumps({"type": "lexical", "phrase_bank": str(tmp_path / "bank.yaml")}),
            "task_model_endpoint": json.dumps({"type": "openai", "base_url": server.base_url, "model": "task",
                                               "temperature": 0.0}),
            "tasks": "[add, sort]", "n_dev": 6, "n_test": 6, "population_size": 3, "generations": 4, "seed": 1}
    args.update(over)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


@pytest.mark.parametrize("algorithm", ["ga", "de"])
def test_search_finds_better_prompt_and_reports_test_only(tmp_path, algorithm):
    write_inputs(tmp_path)
    with OpenAIServer(reply=scripted_task_model) as server:
        metrics = evoprompt.main(argv(tmp_path, server, tmp_path / "out", algorithm=algorithm, generations=6))
        bodies = server.bodies
    out = tmp_path / "out"
    history = json.loads((out / "history.json").read_text())
    best = (out / "best_prompt.txt").read_text().strip()
    assert metrics["operator"] == "lexical" and history["operator"] == "lexical"
    assert "Think step by step." in best and metrics["dev_fitness/best_evolved"] == 1.0
    assert metrics["dev_fitness/best_initial"] < 1.0
    assert metrics["accuracy/test_best_evolved"] == 1.0 > metrics["accuracy/test_best_initial"]
    # The gain's paired SE: the evolved prompt is right everywhere, so the differences are 1 on the m test questions
    # the initial one misses and 0 elsewhere; a 0/1 sample with m ones in n has stdev sqrt(m (n - m) / (n (n - 1))).
    n = 12
    m = round(n * (1 - metrics["accuracy/test_best_initial"]))
    assert 0 < m < n and metrics["accuracy/test_gain"] == pytest.approx(m / n)
    assert metrics["accuracy/test_gain_se"] == pytest.approx((m * (n - m) / (n * (n - 1))) ** 0.5 / n ** 0.5)
    bests = [g["best"] for g in history["generations"]]
    assert bests == sorted(bests) and len(bests) == 7  # elitist: the best never gets worse
    ids = {evoprompt.prompt_id(c["prompt"]) for c in history["candidates"]}
    assert all(set(c["parents"]) <= ids for c in history["candidates"])  # every parent is in the history
    assert {c["origin"] for c in history["candidates"]} == {"initial", algorithm}
    assert sum(c["origin"] == "initial" for c in history["candidates"]) == 4  # the one not selected is there too
    assert (out / "fitness.png").stat().st_size > 1000
    # Only the two final prompts ever saw a test question: the search itself ran on dev alone.
    test_q = {e.question for t in ("add", "sort") for e in make_split(get_task(t), "test", 6)}
    on_test = {b["messages"][0]["content"] for b in bodies if b["messages"][-1]["content"] in test_q}
    best_initial = json.loads((out / "best_prompt.json").read_text())["best_initial_prompt"]
    assert on_test == {best, best_initial}


def test_resume_after_kill_equals_uninterrupted_run(tmp_path, monkeypatch):
    write_inputs(tmp_path)
    with OpenAIServer(reply=scripted_task_model) as server:
        # No hedged copies: on a loaded machine a slow reply gets a second copy, which counts as a request
        # without being a re-ask (it made this count flaky: 178 vs 168 once in four runs under load).
        endpoint = json.dumps({"type": "openai", "base_url": server.base_url, "model": "task", "temperature": 0.0,
                               "hedge_after_s": 0})
        argv_ = functools.partial(argv, task_model_endpoint=endpoint)
        evoprompt.main(argv_(tmp_path, server, tmp_path / "full"))
        full_requests = server.stats["requests"]

        real, calls = evoprompt.ga_generation, []

        def dies_in_generation_3(*a, **k):
            calls.append(1)
            result = real(*a, **k)
            if len(calls) == 3:  # children made and scored, generation not yet saved
                raise KeyboardInterrupt
            return result

        monkeypatch.setattr(evoprompt, "ga_generation", dies_in_generation_3)
        with pytest.raises(KeyboardInterrupt):
            evoprompt.main(argv_(tmp_path, server, tmp_path / "killed"))
        monkeypatch.setattr(evoprompt, "ga_generation", real)
        partial = json.loads((tmp_path / "killed" / "history.json").read_text())
        assert [g["generation"] for g in partial["generations"]] == [0, 1, 2]
        before = server.stats["requests"]
        evoprompt.main(argv_(tmp_path, server, tmp_path / "killed"))
        # The resumed run re-asked nothing already scored: both runs together cost one uninterrupted run.
        assert server.stats["requests"] - full_requests == full_requests
        assert before < 2 * full_requests
    a, b = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("full", "killed"))
    assert a["candidates"] == b["candidates"] and a["generations"] == b["generations"]
    assert (tmp_path / "full" / "best_prompt.txt").read_text() == (tmp_path / "killed" / "best_prompt.txt").read_text()
    # A different recipe on the same output_dir is refused instead of mixing two searches.
    with pytest.raises(RecipeError, match="different recipe"):
        with OpenAIServer(reply=scripted_task_model) as server:
            evoprompt.main(argv_(tmp_path, server, tmp_path / "full", population_size=4))


def test_recipe_errors(tmp_path):
    write_inputs(tmp_path)
    with OpenAIServer(reply=scripted_task_model) as server:
        cases = [
            ({"operator": '{type: lexical, phrase_bank: x.yaml, temprature: 1}'}, "unknown key 'temprature'"),
            ({"operator": "{type: oracle}"}, "oracle"),
            ({"operator": '{type: openai, base_url: http://x, model: m, api_key: sk-1}'}, "never put an API key"),
            ({"initial_prompts": str(tmp_path / "bank.yaml")}, "key 'prompts'"),
            ({"population_size": 2}, "population_size"),
            ({"screen_every": 0}, "'screen_every'"),
            ({"screen_margin": 2}, "'screen_margin'"),
            ({"tasks": "[add, nope]"}, "unknown task 'nope'"),
            ({"dev_file": str(tmp_path / "missing.jsonl"), "test_file": str(tmp_path / "missing.jsonl")}, "not found"),
        ]
        for over, message in cases:
            with pytest.raises(RecipeError, match=message):
                evoprompt.main(argv(tmp_path, server, tmp_path / "err", **over))
        (tmp_path / "dev.jsonl").write_text('{"question": "q1", "answer": "a"}\n{"question": "q2"}\n')
        (tmp_path / "test.jsonl").write_text('{"question": "q1", "answer": "a"}\n')
        with pytest.raises(RecipeError, match=r"dev.jsonl: line 2: needs"):
            evoprompt.main(argv(tmp_path, server, tmp_path / "err", dev_file=tmp_path / "dev.jsonl",
                                test_file=tmp_path / "test.jsonl", metric="exact_match"))
        (tmp_path / "dev.jsonl").write_text('{"question": "q1", "answer": "a"}\n')
        with pytest.raises(RecipeError, match="held out"):
            evoprompt.main(argv(tmp_path, server, tmp_path / "err", dev_file=tmp_path / "dev.jsonl",
                                test_file=tmp_path / "test.jsonl", metric="exact_match"))


def test_local_task_model_run(tmp_path, tiny_model_dir):
    write_inputs(tmp_path)
    out = tmp_path / "local"
    metrics = evoprompt.main(["--output_dir", str(out), "--initial_prompts", str(tmp_path / "init.yaml"),
                              "--operator", json.dumps({"type": "lexical", "phrase_bank": str(tmp_path / "bank.yaml")}),
                              "--task_model_name_or_path", str(tiny_model_dir), "--tasks", "[copy]", "--n_dev", "2",
                              "--n_test", "2", "--population_size", "3", "--generations", "1",
                              "--max_new_tokens", "4"])
    assert metrics["generations"] == 1 and (out / "best_prompt.txt").read_text().strip()
    assert json.loads((out / "stage_result.json").read_text())["artifacts"]["best_prompt"] == str(out / "best_prompt.txt")


def test_run_with_llm_operator_on_loopback(tmp_path, monkeypatch):
    """Paraphrases fill the initial population, GA templates go out, replies are parsed; the key stays secret."""
    (tmp_path / "init.yaml").write_text('prompts: ["Be brief.", "Answer it."]\n')
    monkeypatch.setenv("OP_KEY", "sk-secret-123")
    with OpenAIServer(reply=scripted_task_model) as task, \
            OpenAIServer(reply=scripted_operator, api_key="sk-secret-123", faults={"429": 0.2}) as op:
        spec = {"type": "openai", "base_url": op.base_url, "model": "op", "api_key_env": "OP_KEY", "backoff_s": 0.01}
        metrics = evoprompt.main(argv(tmp_path, task, tmp_path / "llm", operator=json.dumps(spec), generations=2))
        kinds = collections.Counter("Instruction:" in b["messages"][0]["content"] for b in op.bodies)
        assert op.stats["unauthorized"] == 0 and all(b["temperature"] == 0.5 for b in op.bodies)
    assert metrics["operator"].startswith("llm (openai:") and metrics["malformed_operator_replies"] == 0
    assert kinds[True] >= 1 and kinds[False] >= 6  # a paraphrase call, then one GA call per child
    history = json.loads((tmp_path / "llm" / "history.json").read_text())
    origins = collections.Counter(c["origin"] for c in history["candidates"])
    assert origins["paraphrase"] == 1 and origins["ga"] == 6
    assert all(c["prompt"].startswith("GA(") for c in history["candidates"] if c["origin"] == "ga")
    for f in (tmp_path / "llm").iterdir():
        assert b"sk-secret-123" not in f.read_bytes()


def test_racing_scores_clearly_worse_children_on_the_screen_only(tmp_path):
    write_inputs(tmp_path)
    runs = {}
    for every in (1, 2):
        with OpenAIServer(reply=scripted_task_model) as server:
            metrics = evoprompt.main(argv(tmp_path, server, tmp_path / f"out{every}", generations=6,
                                          screen_every=every, screen_margin=0.1))
            runs[every] = (metrics, len(server.bodies), json.loads((tmp_path / f"out{every}/history.json").read_text()))
    (plain, plain_requests, _), (raced, raced_requests, history) = runs[1], runs[2]
    assert plain["prompts_screened_out"] == 0 < raced["prompts_screened_out"]
    assert raced_requests < plain_requests
    assert "Think step by step." in (tmp_path / "out2/best_prompt.txt").read_text()
    assert raced["accuracy/test_best_evolved"] == 1.0
    # A screened-out child keeps its partial score, below the worst member of the population it was made from,
    # so it never survives.
    for g in history["generations"][1:]:
        made = [c for c in history["candidates"] if c["generation"] == g["generation"] and c.get("screened_out")]
        assert not {evoprompt.prompt_id(c["prompt"]) for c in made} & set(g["population"])
