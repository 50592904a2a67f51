"""Where services live on a node's GPUs: the multi-model arbiter's pure planner.

No I/O and no clock (`now` is given), like `policy`: the arbiter asks and carries out the answer.
- `plan`: to serve `want`, load (or wake) it on which GPUs, evicting what, and how (sleep or stop)?
- `takeback`: a job took these GPUs; every resident on them goes, killed, never slept (a sleeping
  vLLM keeps its process and CUDA context on the GPU).
- `idle`: residents whose time-to-live ran out.

What it promises (property-tested, tests/test_placement.py): never over a GPU's budget; nothing
planned onto a GPU a job holds; no eviction of a persistent entry for another group's, of one with requests in flight,
or of one loaded less than `min_residency` ago (a storm of requests for three models on one GPU
cannot thrash faster than that); at most one member of a `swap` group awake at a time.

The rules follow llama-swap's groups: `swap` (one member at a time), `exclusive` (loading a member
evicts the other groups' residents), `persistent` (never evicted for another entry).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

MiB = int


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    swap: bool = True  # one member awake at a time
    exclusive: bool = False  # loading a member evicts every other group's residents (but persistent ones)
    persistent: bool = False  # never evicted for another group's entry (only jobs, TTL and its own swaps)


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    gpus: int = 1  # how many GPUs it runs on (tensor parallel); 0: no GPU at all
    memory: MiB | None = None  # per GPU; None: the whole GPU
    group: str | None = None
    priority: int = 0  # among those that may go, lower priority goes first, then least recently used
    sleep: int = 0  # 0: evicted by a stop; 1 or 2: by vLLM's sleep at that level
    ttl: float | None = None  # idle seconds before it is unloaded


class ResPhase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    SLEEPING = "sleeping"


AWAKE = frozenset({ResPhase.LOADING, ResPhase.READY})


@dataclass(frozen=True, slots=True)
class Resident:
    name: str
    gpus: frozenset[int]
    phase: ResPhase
    since: float  # loaded (or woken) at
    last_used: float
    in_flight: int = 0


@dataclass(frozen=True, slots=True)
class Node:
    budget: Mapping[int, MiB]  # usable MiB per GPU (its total minus a margin), by minor
    blocked: frozenset[int] = frozenset()  # GPUs a job or a foreign process holds
    sleeping: MiB = 1536  # what a sleeping vLLM keeps on each of its GPUs (its CUDA context)
    min_residency: float = 30.0  # seconds after a load before it may be evicted for another


@dataclass(frozen=True, slots=True)
class Evict:
    name: str
    how: Literal["sleep", "stop"]


@dataclass(frozen=True, slots=True)
class Serve:
    name: str


@dataclass(frozen=True, slots=True)
class Wait:
    name: str  # it is loading: queue the request


@dataclass(frozen=True, slots=True)
class Load:
    name: str
    gpus: frozenset[int]
    evict: tuple[Evict, ...] = ()
    wake: bool = False  # it sleeps on `gpus`: wake it rather than start it


@dataclass(frozen=True, slots=True)
class Refuse:
    code: str  # model_does_not_fit (never, here), gpus_taken or model_busy (not now)
    message: str
    retryable: bool


Plan = Serve | Wait | Load | Refuse


def use(svc: Service, phase: ResPhase, gpu: int, node: Node) -> MiB:
    """MiB that `svc` in `phase` takes on `gpu`."""
    whole = node.budget.get(gpu, 0)
    full = whole if svc.memory is None else svc.memory
    return min(node.sleeping, full) if phase is ResPhase.SLEEPING else full


def used(gpu: int, residents: Mapping[str, Resident], services: Mapping[str, Service], node: Node) -> MiB:
    return sum(use(services[r.name], r.phase, gpu, node) for r in residents.values() if gpu in r.gpus)


def takeback(blocked: frozenset[int], residents: Mapping[str, Resident]) -> tuple[str, ...]:
    """Every resident with a GPU among `blocked`, in any phase: each one is stopped."""
    return tuple(sorted(name for name, r in residents.items() if r.gpus & blocked))


def idle(services: Mapping[str, Service], residents: Mapping[str, Resident], now: float) -> tuple[Evict, ...]:
    """Awake residents idle past their ttl (none in flight): slept where they can be, else stopped."""
    out = []
    for name, r in sorted(residents.items()):
        svc = services[name]
        if r.phase is ResPhase.READY and not r.in_flight and svc.ttl is not None and now - r.last_used >= svc.ttl:
            out.append(Evict(name, "sleep" if svc.sleep else "stop"))
    return tuple(out)


def plan(
    want: str,
    services: Mapping[str, Service],
    groups: Mapping[str, Group],
    residents: Mapping[str, Resident],
    node: Node,
    now: float,
) -> Plan:
    svc = services[want]
    me = residents.get(want)
    if me is not None and me.phase is ResPhase.READY:
        return Serve(want)
    if me is not None and me.phase is ResPhase.LOADING:
        return Wait(want)
    never = _never_fits(svc, node)
    if never is not None:
        return Refuse("model_does_not_fit", never, False)
    usable = sorted(g for g in node.budget if g not in node.blocked)
    if svc.gpus > len(usable):
        taken = ",".join(str(g) for g in sorted(node.blocked))
        return Refuse("gpus_taken", f"{want} needs {svc.gpus} GPU(s); jobs hold GPU {taken}", True)

    state = dict(residents)
    evicted: list[Evict] = []
    stuck: list[str] = []  # what would have to go but may not now

    def may_go(r: Resident) -> bool:
        return r.in_flight == 0 and now - r.since >= node.min_residency

    def evict(r: Resident, how: Literal["sleep", "stop"]) -> None:
        evicted.append(Evict(r.name, how))
        if how == "sleep":
            state[r.name] = replace(r, phase=ResPhase.SLEEPING)
        else:
            del state[r.name]

    # The group rules first: what must go whatever the memory says.
    for r in sorted(residents.values(), key=lambda r: r.name):
        if r.name == want or not _rule_evicts(svc, services[r.name], r, groups):
            continue
        if not may_go(r):
            stuck.append(r.name)
        else:
            evict(r, _how(services[r.name], r))
    if stuck:
        return _busy(want, stuck)

    chosen = _fit(svc, me, state, services, node, usable)
    # Then memory: least valuable first (priority, then least recently used), each slept if it can be.
    if chosen is None:
        candidates = sorted(
            (r for r in state.values() if r.name != want and r.gpus & set(usable)),
            key=lambda r: (services[r.name].priority, r.last_used, r.name),
        )
        for r in candidates:
            if _persistent(services[r.name], groups):
                continue
            if not may_go(r):
                stuck.append(r.name)
                continue
            evict(r, "stop" if r.phase is ResPhase.SLEEPING else _how(services[r.name], r))
            chosen = _fit(svc, me, state, services, node, usable)
            if chosen is not None:
                break
        if chosen is None:  # sleeping was not enough: stop instead, in the same order
            for i, e in enumerate(evicted):
                if e.how == "sleep":
                    evicted[i] = Evict(e.name, "stop")
                    state.pop(e.name, None)
            chosen = _fit(svc, me, state, services, node, usable)
    if chosen is None:
        if stuck:
            return _busy(want, stuck)
        blockers = sorted(n for n in residents if n != want and _persistent(services[n], groups))
        if blockers:
            return Refuse("model_does_not_fit", f"{want} does not fit beside persistent {', '.join(blockers)}", False)
        return Refuse("gpus_taken", f"{want} fits only on GPUs that jobs hold now", True)
    return Load(
        want, chosen, _prune(tuple(evicted), svc, me, residents, services, groups, node, usable), me is not None
    )


def _never_fits(svc: Service, node: Node) -> str | None:
    if svc.gpus > len(node.budget):
        return f"{svc.name} needs {svc.gpus} GPU(s); this node has {len(node.budget)}"
    if svc.memory is not None and svc.gpus:
        roomy = sum(1 for b in node.budget.values() if b >= svc.memory)
        if roomy < svc.gpus:
            biggest = max(node.budget.values(), default=0)
            return f"{svc.name} needs {svc.memory} MiB on each of {svc.gpus} GPU(s); a GPU has at most {biggest} MiB"
    return None


def _persistent(svc: Service, groups: Mapping[str, Group]) -> bool:
    g = groups.get(svc.group) if svc.group else None
    return g is not None and g.persistent


def _how(svc: Service, r: Resident) -> Literal["sleep", "stop"]:
    return "sleep" if svc.sleep and r.phase is ResPhase.READY else "stop"


def _busy(want: str, stuck: list[str]) -> Refuse:
    names = ", ".join(sorted(set(stuck)))
    return Refuse(
        "model_busy", f"{want} must wait: {names} cannot be unloaded yet (requests in flight, or just loaded)", True
    )


def _fit(
    svc: Service,
    me: Resident | None,
    state: Mapping[str, Resident],
    services: Mapping[str, Service],
    node: Node,
    usable: list[int],
) -> frozenset[int] | None:
    """GPUs where `svc` fits now (best fit: the least room left over), or None."""
    if svc.gpus == 0:
        return frozenset()
    others = {n: r for n, r in state.items() if me is None or n != me.name}

    def room(g: int) -> MiB:
        return node.budget[g] - used(g, others, services, node) - use(svc, ResPhase.READY, g, node)

    if me is not None:  # it sleeps there: it wakes there
        return me.gpus if not me.gpus & node.blocked and all(room(g) >= 0 for g in me.gpus) else None
    fits = sorted((room(g), g) for g in usable if room(g) >= 0)
    if len(fits) < svc.gpus:
        return None
    return frozenset(g for _, g in fits[: svc.gpus])


def _prune(
    evicted: tuple[Evict, ...],
    svc: Service,
    me: Resident | None,
    residents: Mapping[str, Resident],
    services: Mapping[str, Service],
    groups: Mapping[str, Group],
    node: Node,
    usable: list[int],
) -> tuple[Evict, ...]:
    """Drop evictions the load does not need (latest first), and stops where a sleep is enough;
    those the group rules demand stay."""
    required = {e.name for e in evicted if _rule_evicts(svc, services[e.name], residents[e.name], groups)}
    keep = list(evicted)

    def fits(plan_: list[Evict]) -> bool:
        state = dict(residents)
        for e in plan_:
            if e.how == "sleep":
                state[e.name] = replace(state[e.name], phase=ResPhase.SLEEPING)
            else:
                state.pop(e.name, None)
        return _fit(svc, me, state, services, node, usable) is not None

    for e in reversed(evicted):
        if e.name in required:
            continue
        trial = [x for x in keep if x != e]
        if fits(trial):
            keep = trial
    for i, e in enumerate(keep):
        r = residents[e.name]
        if e.how == "stop" and services[e.name].sleep and r.phase is ResPhase.READY:
            trial = [*keep[:i], Evict(e.name, "sleep"), *keep[i + 1 :]]
            if fits(trial):
                keep = trial
    return tuple(keep)


def _rule_evicts(svc: Service, other: Service, r: Resident, groups: Mapping[str, Group]) -> bool:
    """Whether `svc`'s group rules make resident `r` (of `other`) go when `svc` loads."""
    group = groups.get(svc.group) if svc.group else None
    if group is None:
        return False
    same = other.group == svc.group
    if same:
        return group.swap and r.phase in AWAKE
    return group.exclusive and not _persistent(other, groups)
