"""The hand-written options of the commands without a config dataclass state the library's defaults:
each option named as a parameter of the library function the command calls has that parameter's
default (the config-generated options are checked in test_cli_options.py)."""

import inspect

import pytest

from cir_mine import cli
from cir_mine.miner.core.export import export_negatives
from cir_mine.miner.embed import build_index
from cir_mine.miner.inspection.contact_sheet import contact_sheet
from cir_mine.miner.inspection.report import write_report
from cir_mine.train.metrics import evaluate_file

# command function -> (library function, {option parameter: library parameter, or None where the
# option is not that parameter})
CALLS = {
    "index_cmd": (build_index, {"npy": None}),  # --npy is a switch; the library's npy is --npy-dtype's value
    "inspect": (contact_sheet, {}),
    "report": (write_report, {}),
    "export": (export_negatives, {}),
    "eval_cmd": (evaluate_file, {}),
}


def option_defaults(fn) -> dict:
    """Parameter -> default of each typer option of a command function (arguments and required options left out)."""
    out = {}
    for name, p in inspect.signature(inspect.unwrap(fn)).parameters.items():
        info = p.default
        default = getattr(info, "default", info)
        if default is not ... and type(info).__name__ == "OptionInfo":
            out[name] = default
    return out


@pytest.mark.parametrize("command", sorted(CALLS))
def test_hand_written_options_state_the_library_defaults(command):
    lib, renamed = CALLS[command]
    lib_defaults = {
        n: p.default for n, p in inspect.signature(lib).parameters.items() if p.default is not inspect.Parameter.empty
    }
    shared = {name: renamed.get(name, name) for name in option_defaults(getattr(cli, command))}
    checked = {name: lib_name for name, lib_name in shared.items() if lib_name in lib_defaults}
    assert checked, f"{command}: no option shares a parameter with {lib.__name__}"
    options = option_defaults(getattr(cli, command))
    wrong = {
        name: (options[name], lib_defaults[lib_name])
        for name, lib_name in checked.items()
        if options[name] != lib_defaults[lib_name]
    }
    assert not wrong, f"{command}: option default != {lib.__name__} default: {wrong}"


def test_the_check_sees_a_wrong_default(monkeypatch):
    """The comparison fails when a library default moves away from the option's."""

    def report_like(neg_paths, work, out, overwrite=False, max_negatives=7):
        pass

    monkeypatch.setitem(CALLS, "report", (report_like, {}))
    with pytest.raises(AssertionError, match="max_negatives"):
        test_hand_written_options_state_the_library_defaults("report")
