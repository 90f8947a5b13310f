"""Negative-sampling strategies, one module each, registered by name (see :mod:`.registry`).

Importing this package registers the built-in strategies in the order ``--strategy`` lists them.
See docs/strategies.md for definitions and references.
"""

# ruff: noqa: F401, E402
from cir_mine.miner.core.strategies.registry import (
    REGISTRY,
    NoParams,
    Strategy,
    default_params,
    param_owner,
    parse_mix,
    register,
    split_k,
    unregister,
    validate_params,
)
from cir_mine.miner.core.strategies.selection import (
    Candidates,
    Picks,
    hash_keys,
    pick,
    select,
    select_available,
    splitmix64,
)

# the built-in strategies, in registry order
from cir_mine.miner.core.strategies import (
    random,
    in_batch,
    hardest,
    semihard,
    midzone,
    category,
    category_discrepant,
    attribute_mismatch,
    soft,
    semantic,
    verified,
    kept_mismatch,
    error_targeted,
)
