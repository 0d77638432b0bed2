"""The layers of featcache, enforced: every import of a module (inside functions and under ``TYPE_CHECKING``
too) goes to its own layer or one below; no module imports another in a loop. docs/architecture.md draws
these layers."""

from __future__ import annotations

import pytest

from .architecture import cycles, file_lines, functions, import_graph

# bottom first; a module belongs to the longest prefix that names it
LAYERS = (
    ("foundation", ("featcache.errors", "featcache.version", "featcache.progress", "featcache.net", "featcache.recipes",
                    "featcache.options", "featcache.option_rules")),
    ("data", ("featcache.data",)),
    ("store", ("featcache.store",)),
    ("backbones", ("featcache.backbones",)),
    ("extraction", ("featcache.extraction",)),
    ("evaluation", ("featcache.evaluation",)),
    ("hand-over and reading", ("featcache.deploy", "featcache.reporting")),
    ("workflow", ("featcache.workflow", "featcache.option_checks", "featcache.study")),
    ("doors", ("featcache.api", "featcache.cli", "featcache.__main__", "featcache")),
)


def layer_of(module: str) -> int:
    found = [(len(prefix), k) for k, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
             if module == prefix or module.startswith(prefix + ".")]
    if not found:
        pytest.fail(f"{module} is in no layer of tests/test_architecture.py: add it where it belongs")
    return max(found)[1]


def test_no_module_imports_one_from_a_higher_layer() -> None:
    upward = [f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
              for module, targets in import_graph().items() for target in sorted(targets)
              if layer_of(target) > layer_of(module)]
    assert not upward, "\n".join(upward)


def test_the_doors_call_the_workflow_layer_and_nothing_below_it() -> None:
    """The API, the command line and the package's names are doors over one workflow layer: they may use the
    foundation (options, recipes, errors) and the workflows, and no stage directly."""
    doors = len(LAYERS) - 1
    foundation, workflow = 0, doors - 1
    reaching = [f"{module} imports {target} ({LAYERS[layer_of(target)][0]})"
                for module, targets in import_graph().items() if layer_of(module) == doors
                for target in sorted(targets) if layer_of(target) not in (foundation, workflow, doors)]
    assert not reaching, "\n".join(reaching)


def test_no_import_cycle_of_any_kind() -> None:
    assert cycles(import_graph()) == []


def test_the_layer_check_sees_imports_inside_functions_and_under_type_checking() -> None:
    graph = import_graph()
    assert "featcache.api" in graph["featcache"]  # under TYPE_CHECKING in featcache/__init__.py
    assert "featcache.workflow.demo" in graph["featcache.api"]  # inside a function of the API


# Issue 43's limits: no function over 90 lines, no signature over 10 parameters, no file over 650 lines. A stage
# door takes typed recipes (featcache.recipes), not loose scalars. A scikit-learn estimator is the exception: its
# hyper-parameters are its constructor's keywords (get_params, clone and the grids read them there), and they
# name its runs, so they stay one keyword each.
LONGEST_FUNCTION, WIDEST_SIGNATURE, LONGEST_FILE = 90, 10, 650
ESTIMATOR_CONSTRUCTORS = {"featcache.evaluation.heads:TorchMLPClassifier.__init__"}


def test_functions_signatures_and_files_grow_no_larger() -> None:
    found = functions()
    assert [f for f in found if f[1] > LONGEST_FUNCTION] == []
    assert [f for f in found if f[2] > WIDEST_SIGNATURE and f[0] not in ESTIMATOR_CONSTRUCTORS] == []
    assert [name for name, lines in file_lines().items() if lines > LONGEST_FILE] == []
