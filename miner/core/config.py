"""The mining config: :class:`MineConfig`, its validation, and one flat namespace of options over it,
its guards and every strategy's parameters (``MineConfig.of(strategy="midzone", delta_lo=0.05)``);
it round-trips through a negatives table's footer (``to_dict`` / ``from_dict``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from cir_mine.data.checks import check_numbers
from cir_mine.data.errors import UsageError
from cir_mine.miner.core.curriculum import mix_at, parse_schedule
from cir_mine.miner.core.guards import GuardConfig
from cir_mine.miner.core.search.build import check_device
from cir_mine.miner.core.search.params import parse_search_params
from cir_mine.miner.core.strategies import (
    REGISTRY,
    default_params,
    param_owner,
    parse_mix,
    validate_params,
)

QUERY_SOURCES = ("zero-shot", "checkpoint")


SAMPLE_ORDERS = ("top", "random")


@dataclass
class MineConfig:
    # fmt: off
    strategy: Optional[str] = None        # one strategy, by its registry name (or use mix / schedule)
    mix: Optional[str] = None             # a mix, e.g. midzone:0.6,category:0.3,random:0.1 (k split by shares)
    schedule: Optional[str] = None        # curriculum epoch:mix, e.g. 0:random,2:midzone,4:hardest (stored for
                                          # cir-train; mines the mix of the mining round)
    k: int = 10                           # negatives per query
    seed: int = 0                         # sampling seed (same seed, same table; per query: hash of seed and query_id)
    query: str = "zero-shot"              # query embeddings: zero-shot or checkpoint (passed in)
    text_weight: float = 1.0              # zero-shot query: normalize(ref + text_weight * text)
    candidates: Optional[int] = None      # search depth per query (None: max(4k, range_max, 128))
    max_candidates: Optional[int] = 2048  # queries still short of k are searched again, 4x deeper, up to this depth
                                          # (None: never)
    query_batch: int = 4096               # queries per search batch (bounds memory)
    sample: Optional[str] = None          # selection order of ranked strategies: top | random (None: each one's own)
    random_draws: int = 32                # random, category: uniform draws per query beyond 2k
    device: str = "auto"                  # auto | cpu | cuda, by the one device rule (cir_mine.miner.accel.device)
    fp16: bool = False                    # GPU index: store float16 vectors (flat and IVF; scores are still re-ranked
                                          # in float32)
    index: str = "flat"                   # search back-end: flat (exact), workspace (the saved index.{split}.faiss),
                                          # ivf, ivfpq, hnsw or a FAISS factory string; approximate candidates are
                                          # re-ranked exactly
    nprobe: Optional[int] = None          # IVF: inverted lists visited (None: tuned to target_recall)
    ef_search: Optional[int] = None       # HNSW: efSearch (None: tuned to target_recall)
    search_params: Optional[str] = None   # FAISS search parameters instead of nprobe / ef_search, e.g. nprobe=16
    overfetch: Optional[float] = None     # approximate candidates fetched per kept one before exact re-ranking (None: 1, 4 for PQ/SQ codes)
    target_recall: Optional[float] = 0.98 # approximate indexes: tune nprobe / efSearch to this candidate recall@depth (None: FAISS defaults)
    tune_queries: int = 1000              # sampled queries the tuning measures recall on
    check_recall: int = 0                 # report candidate recall and the overlap of mined negatives with exact
                                          # mining on this many sampled queries (0: off)
    prefetch: Optional[bool] = None       # search the next query batch while the current one is guarded (None: with a
                                          # GPU index)
    guards: GuardConfig = field(default_factory=GuardConfig)  # the false-negative guards
    params: dict = field(default_factory=default_params)      # strategy name -> its parameter dataclass
    # fmt: on

    # -- flat options: one namespace over this config, its guards and every strategy's parameters
    @classmethod
    def option_owners(cls) -> dict:
        """Option name -> where it lives: 'config', 'guards' or a strategy name."""
        owners = {f.name: "config" for f in dataclasses.fields(cls) if f.name not in ("guards", "params")}
        owners.update({f.name: "guards" for f in dataclasses.fields(GuardConfig)})
        owners.update(param_owner())
        return owners

    @classmethod
    def option_fields(cls) -> dict:
        """Option name -> the dataclass that defines it: this config, GuardConfig or a strategy's parameters."""
        classes = {"config": cls, "guards": GuardConfig}
        return {name: classes.get(owner) or REGISTRY[owner].params for name, owner in cls.option_owners().items()}

    @classmethod
    def of(cls, **options) -> "MineConfig":
        """A config from flat options, each named as its field is: this config's, GuardConfig's or a
        strategy's parameter, e.g. ``MineConfig.of(strategy="midzone", delta_lo=0.05, rho=None)``."""
        return cls().replace(**options)

    def replace(self, **options) -> "MineConfig":
        """A copy with flat options changed (see :meth:`of`)."""
        owners = self.option_owners()
        unknown = sorted(set(options) - set(owners))
        if unknown:
            raise UsageError(f"unknown mining option(s) {', '.join(unknown)}.", params=tuple(unknown))
        top, guards, params = {}, {}, {}
        for name, value in options.items():
            owner = owners[name]
            if owner == "config":
                top[name] = value
            elif owner == "guards":
                guards[name] = value
            else:
                params.setdefault(owner, {})[name] = _typed(REGISTRY[owner].params, name, value)
        new_params = dict(self.params)
        for owner, values in params.items():
            new_params[owner] = dataclasses.replace(self.params_of(owner), **values)
        return dataclasses.replace(self, **top, guards=dataclasses.replace(self.guards, **guards), params=new_params)

    def options(self) -> dict:
        """Every flat option with its value (the inverse of :meth:`of`)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("guards", "params")}
        out.update(dataclasses.asdict(self.guards))
        for name in REGISTRY:
            out.update(dataclasses.asdict(self.params_of(name)))
        return out

    def params_of(self, strategy: str):
        """The parameter dataclass of ``strategy`` (its defaults where this config sets none)."""
        p = self.params.get(strategy)
        return p if p is not None else REGISTRY[strategy].params()

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("guards", "params")}
        d["guards"] = dataclasses.asdict(self.guards)
        d["params"] = {
            name: {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(p).items()}
            for name, p in self.params.items()
            if dataclasses.fields(p)
        }
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MineConfig":
        """Inverse of :meth:`to_dict`; flat option names (tables mined by earlier versions) are read too."""
        d = dict(d)
        guards, params = d.pop("guards", None) or {}, d.pop("params", None) or {}
        flat = {**guards, **{k: v for p in params.values() for k, v in p.items()}, **d}
        try:
            return cls.of(**flat)
        except UsageError as e:
            raise UsageError(str(e).replace("option(s)", "config key(s)"), params=e.params) from None

    def parts(self, mining_round: int = 0) -> list[tuple[str, float]]:
        """The (strategy, share) mix this config mines at ``mining_round``."""
        given = [x for x in (self.strategy, self.mix) if x]
        if len(given) > 1:
            raise UsageError("give either strategy or mix, not both.", params=("strategy", "mix"))
        if given:
            return parse_mix(given[0])
        if self.schedule:
            return mix_at(parse_schedule(self.schedule), mining_round)
        raise UsageError(
            "nothing to mine: pass strategy NAME, mix SPEC or schedule SPEC.", params=("strategy", "mix", "schedule")
        )

    def validate(self, mining_round: int = 0) -> list[tuple[str, float]]:
        """Check every option (errors name the option); returns the mix of ``mining_round``."""
        check_numbers(self)
        parts = self.parts(mining_round)
        if self.k < 1:
            raise UsageError(f"k must be at least 1 (got {self.k}).", params=("k",))
        if self.query not in QUERY_SOURCES:
            raise UsageError(f"query {self.query!r}: use zero-shot or checkpoint.", params=("query",))
        if self.sample is not None and self.sample not in SAMPLE_ORDERS:
            raise UsageError(f"sample {self.sample!r}: use top or random.", params=("sample",))
        if self.max_candidates is not None and self.max_candidates < 1:
            raise UsageError(
                "max_candidates must be at least 1 (use max_candidates=None to switch deepening off).",
                params=("max_candidates", "max_candidates=None"),
            )
        if self.candidates is not None and self.candidates < 1:
            raise UsageError("candidates must be at least 1.", params=("candidates",))
        if self.query_batch < 1:
            raise UsageError("query_batch must be at least 1.", params=("query_batch",))
        check_device(self.device)
        self.guards.validate()
        validate_params(self.params)
        if self.schedule:
            parse_schedule(self.schedule)
        if self.target_recall is not None and not 0 < self.target_recall <= 1:
            raise UsageError(f"target_recall must be in (0, 1] (got {self.target_recall}).", params=("target_recall",))
        if self.check_recall < 0:
            raise UsageError("check_recall must be at least 0.", params=("check_recall",))
        if self.tune_queries < 1:
            raise UsageError("tune_queries must be at least 1.", params=("tune_queries",))
        for name, v in (("nprobe", self.nprobe), ("ef_search", self.ef_search)):
            if v is not None and v < 1:
                raise UsageError(f"{name} must be at least 1 (got {v}).", params=(name,))
        if self.search_params and (self.nprobe or self.ef_search):
            raise UsageError(
                "give either search_params or nprobe / ef_search, not both.",
                params=("search_params", "nprobe", "ef_search"),
            )
        if self.overfetch is not None and self.overfetch < 1:
            raise UsageError(f"overfetch must be at least 1 (got {self.overfetch}).", params=("overfetch",))
        self.fixed_params()
        return parts

    def fixed_params(self) -> dict:
        """The search parameters given explicitly ({} when they are to be tuned or left at defaults)."""
        out = parse_search_params(self.search_params)
        if self.nprobe is not None:
            out["nprobe"] = int(self.nprobe)
        if self.ef_search is not None:
            out["efSearch"] = int(self.ef_search)
        return out

    def depth(self, k: int) -> int:
        if self.candidates is not None:
            return self.candidates
        return max(4 * k, self.params_of("hardest").range_max or 0, 128)


def _typed(params_cls: type, name: str, value):
    """JSON lists back to tuples for tuple-valued parameters (category_shares)."""
    default = {f.name: f.default for f in dataclasses.fields(params_cls)}[name]
    return tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
