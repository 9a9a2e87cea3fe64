"""`distill generate --estimate`: what the generate stage will send and cost, before it runs.

Without a pilot no request is sent: the requests are counted from the task, the prompt tokens
by the teacher's tokenizer (an API teacher's `generate.tokenizer`; without one, about one
token per 4 bytes), the completion tokens bounded by `n_samples * max_new_tokens`, and the
responses already in the run's request cache (paid before) set apart. With
`generate.pilot_questions=P`, the first P questions of the first shard are sent exactly as the
stage sends them (live, whatever the transport: a pilot should not wait on a batch window), so
the run answers them from the cache and never pays twice; their mean completion length
replaces the bound, and the filter's own checks on them give the share of traces kept and of
questions covered, hence the expected cost per kept trace and per covered question.
"""

from __future__ import annotations

import dataclasses
import math

import pyarrow as pa

from pipeline.config import Config
from pipeline.costs import Prices, money
from pipeline.kept_aside import REQUEST_CACHE
from pipeline.prompts import PromptTemplate
from pipeline.registry import BACKENDS
from pipeline.run_folder import RunFolder
from pipeline.stage import Shard


def _prompt_tokens(cfg: Config, prompts: list[str]) -> tuple[int, str]:
    """The prompts' tokens and how they were counted."""
    g = cfg.generate
    api = BACKENDS.get(g.backend).request_cache
    name = g.tokenizer if api else g.model
    if name:
        from pipeline.models import load_tokenizer, resolve_model

        tok = load_tokenizer(resolve_model(name))
        ids = tok(prompts, add_special_tokens=False)["input_ids"]
        chat = 8 if (g.endpoint == "chat" if api else g.chat_template) else 0
        return sum(len(x) + chat for x in ids), f"counted by the tokenizer of {name}"
    return sum(len(p.encode()) // 4 for p in prompts), (
        "about 1 token per 4 bytes (set generate.tokenizer for exact counts)")


def _cached(cfg: Config, run: RunFolder, shards: list[Shard],
            prompts_of) -> tuple[int, int, int]:
    """How many of the first round's requests the run's request cache answers, how many
    responses it holds in all, and the completion tokens of those it answers (an API teacher;
    local engines have no cache)."""
    g = cfg.generate
    if not BACKENDS.get(g.backend).request_cache or not run.is_local:
        return 0, 0, 0
    if not run.stage("generate").exists(REQUEST_CACHE):  # (asking makes no folder)
        return 0, 0, 0
    path = run.stage("generate").local.path(REQUEST_CACHE, "the request cache")
    from stages.backends.openai_api import request_body_for
    from stages.backends.request_cache import RequestCache, request_key
    from stages.generate.stage import first_round_sampling

    cache = RequestCache(path)
    try:
        found = completion = 0
        for shard in shards:
            settings = first_round_sampling(g, shard.name)
            for prompt in prompts_of(shard):
                used = cache.usage(request_key(request_body_for(g, prompt, settings)))
                if used:
                    found += 1
                    completion += used[1]
        held = cache.db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        return found, held, completion
    finally:
        cache.db.close()


def _pilot(cfg: Config, run: RunFolder, shard: Shard) -> dict:
    """The first `pilot_questions` of `shard` through the teacher as the stage sends them;
    their traces through the filter's checks."""
    from stages.generate.stage import GenerateSettings, generate_shard, teacher_factory
    from stages.checks.keep import FilterSettings, decide, kept_per_question
    from stages.checks.answers import answer_checker
    from stages.generate.rounds import wanted

    g = cfg.generate
    live = cfg.replace(generate=dataclasses.replace(g, transport="live"))
    part = shard.load().slice(0, g.pilot_questions)
    teacher = teacher_factory(live, run.stage("generate"))()
    try:
        out = generate_shard(GenerateSettings(live.generate, PromptTemplate(g.prompt_template)),
                             Shard.of(shard.name, part), teacher)
    finally:
        if hasattr(teacher, "close"):
            teacher.close()
    table: pa.Table = out.tables["traces"]
    settings = FilterSettings(cfg.filter, answer_checker(cfg, cfg.filter.extractors),
                              wanted(cfg))
    small, results, by_question = decide(table.filter(pa.compute.is_null(
        table.column("error"))), settings)
    kept = sum(1 for r in results if r[0] is None)
    covered = sum(1 for n in kept_per_question(small, results, by_question).values() if n)
    c = out.counters
    return {"questions": part.num_rows, "traces": c["traces"], "errors": c["errors"],
            "kept": kept, "covered": covered, "completion_tokens": c["completion_tokens"],
            "prompt_tokens": c["prompt_tokens"], "cost": c["cost"],
            "requests": c.get("requests", 0), "cached": c.get("cached", 0)}


def estimate(cfg: Config, run: RunFolder) -> dict:
    """The estimate (printed by `distill generate --estimate`, returned for tests)."""
    from stages.generate.stage import task_shards

    g = cfg.generate
    prices = Prices.of(g)
    template = PromptTemplate(g.prompt_template)
    shards = task_shards(cfg)

    def prompts_of(shard: Shard) -> list[str]:
        return [template.render(q) for q in shard.load().column("question").to_pylist()]

    prompts = [p for s in shards for p in prompts_of(s)]
    requests, samples = len(prompts), len(prompts) * g.n_samples
    prompt_tokens, counted = _prompt_tokens(cfg, prompts)
    pilot = _pilot(cfg, run, shards[0]) if g.pilot_questions and shards else None
    cached, held, cached_completion = _cached(cfg, run, shards, prompts_of)
    bound = samples * g.max_new_tokens
    if pilot and pilot["traces"]:
        per_sample = pilot["completion_tokens"] / pilot["traces"]
        completion, how = round(per_sample * samples), (
            f"{per_sample:.0f} per trace, measured on the pilot")
    elif cached:
        per_sample = cached_completion / (cached * g.n_samples)
        completion, how = round(per_sample * samples), (
            f"{per_sample:.0f} per trace, measured on the {cached:,} cached responses")
    else:
        completion, how = bound, f"at most {g.max_new_tokens} per trace (max_new_tokens)"
    batch = g.transport == "batch"
    cost = prices.cost(prompt_tokens, completion, batch)
    api = BACKENDS.get(g.backend).request_cache
    if not api and prices.hour:  # a local engine by the hour: only a pilot tells its time
        if pilot and pilot["questions"]:
            cost = pilot["cost"] * len(prompts) / pilot["questions"]
        else:
            cost = math.nan
    to_send = (requests - cached) / max(1, requests)
    out = {"api": api, "requests": requests, "samples": samples, "cached_requests": cached,
           "cache_responses": held, "prompt_tokens": prompt_tokens, "prompt_counted": counted,
           "completion_tokens": completion, "completion_bound": bound, "completion_how": how,
           "cost": cost, "cost_to_send": cost * to_send, "transport": g.transport,
           "live_cost": prices.cost(prompt_tokens, completion),
           "batch_cost": prices.cost(prompt_tokens, completion, True),
           "priced": prices.priced, "pilot": pilot}
    if pilot and pilot["traces"]:
        out["kept_share"] = pilot["kept"] / pilot["traces"]
        out["covered_share"] = pilot["covered"] / max(1, pilot["questions"])
        out["kept"] = out["kept_share"] * samples
        out["covered"] = out["covered_share"] * requests
        out["cost_per_kept"] = cost / max(1e-9, out["kept"])
        out["cost_per_covered"] = cost / max(1e-9, out["covered"])
    if g.max_samples > g.n_samples:
        short = 1 - out.get("covered_share", 0.0)
        extra = round(requests * short * (g.max_samples - g.n_samples))
        out["later_rounds_samples_at_most"] = extra
    return out


def lines(e: dict, cfg: Config) -> list[str]:
    """The estimate in words."""
    g = cfg.generate
    out = [f"requests: {e['requests']:,} (one per question, {g.n_samples} sample(s) each: "
           f"{e['samples']:,} traces) in the first round" + (
               f"; {e['cached_requests']:,} already answered in the run's request cache (paid "
               "before, not again)" if e["api"] else ""),
           f"prompt tokens: {e['prompt_tokens']:,}, {e['prompt_counted']}",
           f"completion tokens: {e['completion_tokens']:,} ({e['completion_how']}; the bound "
           f"is {e['completion_bound']:,})"]
    if not e["api"] and g.price_hour:
        out.append(f"cost: {money(e['cost'])} at generate.price_hour={g.price_hour:g}, from the "
                   "pilot's engine time" if not math.isnan(e["cost"]) else
                   "cost: a local engine is priced by its time, which only a pilot measures "
                   "(generate.pilot_questions)")
    elif e["priced"] and not e["api"]:
        out.append(f"cost: {money(e['cost'])} at the token prices")
    elif e["priced"]:
        out.append(f"cost: {money(e['live_cost'])} live, {money(e['batch_cost'])} through a "
                   f"batch API; this run ({e['transport']}): {money(e['cost'])}, of which "
                   f"{money(e['cost_to_send'])} is still to be paid")
    else:
        out.append("cost: not priced (set generate.price_input and generate.price_output, per "
                   "million tokens)")
    p = e.get("pilot")
    if p:
        out.append(f"pilot: {p['questions']} questions, {p['traces']} traces, {p['kept']} kept "
                   f"by the filter, {p['covered']} questions covered ({p['requests']} requests "
                   f"sent, {p['cached']} from the cache; the run reuses them)")
    if "kept" in e:
        line = (f"expected: {e['kept']:,.0f} kept traces ({e['kept_share']:.0%}), "
                f"{e['covered']:,.0f} covered questions ({e['covered_share']:.0%})")
        if e["priced"] and not math.isnan(e["cost"]):
            line += (f"; {money(e['cost_per_kept'])} per kept trace, "
                     f"{money(e['cost_per_covered'])} per covered question")
        out.append(line)
    if "later_rounds_samples_at_most" in e:
        out.append(f"adaptive sampling (max_samples={g.max_samples}): later rounds add at most "
                   f"{e['later_rounds_samples_at_most']:,} samples"
                   + (" for the questions the pilot leaves short" if p else ""))
    if g.budget or g.budget_tokens:
        cap = (money(g.budget) if g.budget else f"{g.budget_tokens:,} tokens")
        out.append(f"budget: {cap}; the stage stops before a request could pass it")
    return out
