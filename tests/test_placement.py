"""The arbiter's planner (watchdog_llm/placement.py): examples of each rule, then a randomized storm
of requests, loads, failures, requests in flight, jobs and idle time, with its invariants checked
after every step."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from watchdog_llm.placement import (
    AWAKE,
    Evict,
    Group,
    Load,
    Node,
    Refuse,
    Resident,
    ResPhase,
    Serve,
    Service,
    Wait,
    idle,
    plan,
    takeback,
    use,
    used,
)

H100 = 80_000
TWO = Node({0: H100, 1: H100}, min_residency=10)


def ready(name: str, gpus: set[int], *, since: float = 0, last: float = 0, in_flight: int = 0) -> Resident:
    return Resident(name, frozenset(gpus), ResPhase.READY, since, last, in_flight)


def svcs(*s: Service) -> dict[str, Service]:
    return {x.name: x for x in s}


def test_a_resident_is_served_and_a_loading_one_waited_for() -> None:
    s = svcs(Service("a", memory=30_000))
    assert plan("a", s, {}, {"a": ready("a", {0})}, TWO, 100) == Serve("a")
    loading = Resident("a", frozenset({0}), ResPhase.LOADING, 99, 99)
    assert plan("a", s, {}, {"a": loading}, TWO, 100) == Wait("a")


def test_models_that_fit_together_coexist_best_fit() -> None:
    s = svcs(Service("a", memory=50_000), Service("b", memory=20_000), Service("c", memory=40_000))
    res = {"a": ready("a", {0})}
    # b fits beside a on GPU 0 (30 000 left): best fit packs it there, keeping GPU 1 whole for a big one.
    assert plan("b", s, {}, res, TWO, 100) == Load("b", frozenset({0}))
    # c does not fit beside a: GPU 1, nothing evicted.
    assert plan("c", s, {}, res, TWO, 100) == Load("c", frozenset({1}))


def test_lru_is_evicted_first_and_lower_priority_before_it() -> None:
    s = svcs(Service("a"), Service("b"), Service("c"), Service("vip", priority=5))
    res = {"a": ready("a", {0}, last=50), "b": ready("b", {1}, last=20)}
    assert plan("c", s, {}, res, TWO, 100) == Load("c", frozenset({1}), (Evict("b", "stop"),))
    res = {"vip": ready("vip", {0}, last=10), "b": ready("b", {1}, last=90)}
    assert plan("c", s, {}, res, TWO, 100) == Load("c", frozenset({1}), (Evict("b", "stop"),))


def test_in_flight_and_just_loaded_are_never_evicted_the_request_waits() -> None:
    s = svcs(Service("a"), Service("b"), Service("c"))
    busy = {"a": ready("a", {0}, in_flight=2), "b": ready("b", {1}, since=95)}
    p = plan("c", s, {}, busy, TWO, 100)
    assert isinstance(p, Refuse) and p.code == "model_busy" and p.retryable
    assert "a, b" in p.message


def test_sleep_is_used_where_it_frees_enough_and_a_sleeper_wakes_in_place() -> None:
    node = Node({0: H100}, sleeping=2_000, min_residency=0)
    s = svcs(Service("a", memory=60_000, sleep=1), Service("b", memory=60_000, sleep=1))
    p = plan("b", s, {}, {"a": ready("a", {0})}, node, 100)
    assert p == Load("b", frozenset({0}), (Evict("a", "sleep"),))
    res = {"a": Resident("a", frozenset({0}), ResPhase.SLEEPING, 0, 0), "b": ready("b", {0}, last=100)}
    assert used(0, res, s, node) == 62_000
    assert plan("a", s, {}, res, node, 200) == Load("a", frozenset({0}), (Evict("b", "sleep"),), wake=True)


def test_sleeping_is_not_enough_then_it_is_a_stop() -> None:
    node = Node({0: H100}, sleeping=25_000, min_residency=0)
    s = svcs(Service("a", memory=60_000, sleep=2), Service("b", memory=60_000))
    assert plan("b", s, {}, {"a": ready("a", {0})}, node, 1) == Load("b", frozenset({0}), (Evict("a", "stop"),))


def test_group_rules_swap_exclusive_persistent() -> None:
    g = {
        "chat": Group("chat", swap=True),
        "solo": Group("solo", exclusive=True),
        "keep": Group("keep", persistent=True),
    }
    s = svcs(
        Service("a", memory=10_000, group="chat"),
        Service("b", memory=10_000, group="chat"),
        Service("big", group="solo"),
        Service("tts", memory=5_000, group="keep"),
        Service("emb", memory=5_000),
    )
    res = {"a": ready("a", {0}), "tts": ready("tts", {0}), "emb": ready("emb", {1})}
    # swap: a goes although b would fit beside it.
    assert plan("b", s, g, res, TWO, 100) == Load("b", frozenset({0}), (Evict("a", "stop"),))
    # exclusive: everything but the persistent one goes; big takes the GPU without tts.
    p = plan("big", s, g, res, TWO, 100)
    assert (
        isinstance(p, Load) and p.gpus == frozenset({1}) and set(p.evict) == {Evict("a", "stop"), Evict("emb", "stop")}
    )
    # persistent blocks: a whole-GPU model cannot go on GPU 0 while tts holds it, and tts is never evicted.
    only = Node({0: H100}, min_residency=10)
    p = plan("big", s, g, {"tts": ready("tts", {0})}, only, 100)
    assert isinstance(p, Refuse) and p.code == "model_does_not_fit" and "persistent tts" in p.message


def test_never_fits_is_409_and_gpus_taken_is_retryable() -> None:
    s = svcs(Service("huge", memory=90_000), Service("tp4", gpus=4), Service("one"))
    p = plan("huge", s, {}, {}, TWO, 0)
    assert isinstance(p, Refuse) and p.code == "model_does_not_fit" and not p.retryable and "90000 MiB" in p.message
    p = plan("tp4", s, {}, {}, TWO, 0)
    assert isinstance(p, Refuse) and p.code == "model_does_not_fit" and "has 2" in p.message
    p = plan("one", s, {}, {}, replace(TWO, blocked=frozenset({0, 1})), 0)
    assert isinstance(p, Refuse) and p.code == "gpus_taken" and p.retryable


def test_a_job_takes_back_everything_on_its_gpus_and_only_that() -> None:
    res = {
        "a": ready("a", {0}),
        "b": Resident("b", frozenset({0, 1}), ResPhase.SLEEPING, 0, 0),
        "c": Resident("c", frozenset({2}), ResPhase.LOADING, 0, 0),
        "d": ready("d", {3}),
    }
    assert takeback(frozenset({0}), res) == ("a", "b")
    assert takeback(frozenset({2, 3}), res) == ("c", "d")


def test_idle_past_ttl_unloads_sleeping_where_it_can() -> None:
    s = svcs(Service("a", ttl=60, sleep=1), Service("b", ttl=60), Service("c"), Service("d", ttl=60))
    res = {
        "a": ready("a", {0}, last=0),
        "b": ready("b", {1}, last=0),
        "c": ready("c", {2}, last=0),
        "d": ready("d", {3}, last=0, in_flight=1),
    }
    assert idle(s, res, 59) == ()
    assert idle(s, res, 60) == (Evict("a", "sleep"), Evict("b", "stop"))


# ---- the storm ------------------------------------------------------------------------------------


def service(name: str) -> st.SearchStrategy[Service]:
    return st.builds(
        Service,
        name=st.just(name),
        gpus=st.sampled_from([0, 1, 1, 1, 2]),
        memory=st.sampled_from([None, 10_000, 30_000, 50_000, 70_000]),
        group=st.sampled_from([None, None, "g1", "g2"]),
        priority=st.integers(0, 2),
        sleep=st.sampled_from([0, 0, 1, 2]),
        ttl=st.sampled_from([None, 5.0, 30.0]),
    )


SERVICES = st.tuples(*(service(n) for n in "abcde"))
GROUPS = st.fixed_dictionaries(
    {
        "g1": st.builds(
            Group, name=st.just("g1"), swap=st.booleans(), exclusive=st.booleans(), persistent=st.booleans()
        ),
        "g2": st.builds(
            Group, name=st.just("g2"), swap=st.booleans(), exclusive=st.booleans(), persistent=st.booleans()
        ),
    }
)
REQUEST = st.tuples(st.just("request"), st.sampled_from("abcde"))
LOADED = st.tuples(st.just("loaded"), st.sampled_from("abcde"))
STEP = st.one_of(  # requests and loads most often: contention is what the rules are about
    REQUEST,
    REQUEST,
    REQUEST,
    LOADED,
    LOADED,
    st.tuples(st.just("failed"), st.sampled_from("abcde")),
    st.tuples(st.just("begin"), st.sampled_from("abcde")),
    st.tuples(st.just("end"), st.sampled_from("abcde")),
    st.tuples(st.just("job"), st.integers(0, 1)),
    st.tuples(st.just("job_end"), st.integers(0, 1)),
    st.tuples(st.just("tick"), st.sampled_from([1.0, 5.0, 20.0])),
    st.tuples(st.just("tick"), st.sampled_from([1.0, 5.0, 20.0])),
)


def check(services: dict[str, Service], groups: dict[str, Group], res: dict[str, Resident], node: Node) -> None:
    for g, budget in node.budget.items():
        assert used(g, res, services, node) <= budget, (g, res)
    for r in res.values():
        assert not r.gpus & node.blocked, (r, node.blocked)
        assert len(r.gpus) == services[r.name].gpus
    for g in groups.values():
        if g.swap:
            awake = [r.name for r in res.values() if services[r.name].group == g.name and r.phase in AWAKE]
            assert len(awake) <= 1, (g, awake)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SERVICES, GROUPS, st.lists(STEP, min_size=30, max_size=80))
def test_a_storm_of_requests_jobs_and_failures_keeps_every_promise(
    services_list: tuple[Service, ...], groups: dict[str, Group], steps: list[tuple[str, object]]
) -> None:
    services = {s.name: s for s in services_list}
    node = Node({0: H100, 1: 40_000}, sleeping=2_000, min_residency=3)  # small: contention
    res: dict[str, Resident] = {}
    now = 100.0
    for op, arg in steps:
        name = str(arg)
        if op == "request" and name in services:
            before = dict(res)
            p = plan(name, services, groups, res, node, now)
            # What the storm reached (pytest --hypothesis-show-statistics): every kind of answer.
            event(f"{type(p).__name__}{' ' + p.code if isinstance(p, Refuse) else ''}")
            if isinstance(p, Load) and p.evict:
                event("Load with evictions" + (" (sleep)" if any(e.how == "sleep" for e in p.evict) else ""))
            if isinstance(p, Load):
                assert len(p.gpus) == services[name].gpus and not p.gpus & node.blocked
                for e in p.evict:
                    gone = before[e.name]
                    assert gone.in_flight == 0 and now - gone.since >= node.min_residency, (e, gone)
                    g = groups.get(services[e.name].group or "")
                    # persistent: never evicted for another group's entry (a swap within its group is the rule)
                    assert not (g and g.persistent) or services[name].group == g.name, e
                    if e.how == "sleep":
                        assert services[e.name].sleep and gone.phase is ResPhase.READY
                        res[e.name] = replace(gone, phase=ResPhase.SLEEPING)
                    else:
                        del res[e.name]
                if p.wake:
                    assert before[name].phase is ResPhase.SLEEPING and before[name].gpus == p.gpus
                res[name] = Resident(name, p.gpus, ResPhase.LOADING, now, now)
            elif isinstance(p, Refuse) and not p.retryable:
                # "never fits" must be true: not on this node's GPUs even empty, or beside a persistent entry.
                empty = plan(name, services, groups, {}, replace(node, blocked=frozenset()), now)
                assert not isinstance(empty, Load) or "persistent" in p.message, (p, empty)
            elif isinstance(p, Serve):
                assert before[name].phase is ResPhase.READY
        elif op == "loaded" and name in res and res[name].phase is ResPhase.LOADING:
            res[name] = replace(res[name], phase=ResPhase.READY)
        elif op == "failed" and name in res and res[name].phase is ResPhase.LOADING:
            del res[name]
        elif op == "begin" and name in res and res[name].phase is ResPhase.READY:
            res[name] = replace(res[name], in_flight=res[name].in_flight + 1, last_used=now)
        elif op == "end" and name in res and res[name].in_flight:
            res[name] = replace(res[name], in_flight=res[name].in_flight - 1, last_used=now)
        elif op == "job":
            node = replace(node, blocked=node.blocked | {int(str(arg))})
            for gone_name in takeback(node.blocked, res):
                del res[gone_name]
        elif op == "job_end":
            node = replace(node, blocked=node.blocked - {int(str(arg))})
        elif op == "tick":
            now += float(str(arg))
            for e in idle(services, res, now):
                assert res[e.name].in_flight == 0
                if e.how == "sleep":
                    res[e.name] = replace(res[e.name], phase=ResPhase.SLEEPING)
                else:
                    del res[e.name]
        check(services, groups, res, node)


def test_on_an_empty_node_whatever_fits_is_loaded() -> None:
    """Completeness: with nothing resident and no job, a service that fits some GPUs is planned."""
    node = Node({0: H100, 1: 40_000})
    for memory in (None, 10_000, 40_000, 80_000):
        for gpus in (0, 1, 2):
            s = Service("x", gpus=gpus, memory=memory)
            p = plan("x", {"x": s}, {}, {}, node, 0)
            fits = gpus == 0 or (memory is None or sum(b >= memory for b in node.budget.values()) >= gpus)
            assert isinstance(p, Load) == fits, (s, p)
            if isinstance(p, Load):
                assert all(use(s, ResPhase.READY, g, node) <= node.budget[g] for g in p.gpus)
