"""A corpus of broken configs and overrides: each fails with its own named error, fast, building nothing.

Every case starts from tests/fixtures/tiny.yaml (optionally edited as text, as a user would mistype
their file), applies overrides and validates against tiny_recipe.py's CONFIG_KEYS/RUNTIME_ARGS.
The assertion names the exact key path and the specific message, including the did-you-mean.
"""

from __future__ import annotations

import time

import ftcore_test_components as fx
import pytest

from ftcore.cli.recipes import static_declarations
from ftcore.config import ConfigError, apply_overrides, load_config, validate_config

# (case id, (old, new) text edit of tiny.yaml or None, overrides, expected key path, expected message part)
CORPUS = [
    # typos at every depth, in overrides
    ("override-typo-top", None, ["stpes=3"], "stpes", "no such key in the config. Did you mean `steps`"),
    ("override-typo-depth2", None, ["model.hiden_dim=3"], "model.hiden_dim", "Did you mean `hidden_dim`"),
    (
        "override-typo-depth3",
        None,
        ["model.norm.normalized_shap=4"],
        "model.norm.normalized_shap",
        "Did you mean `normalized_shape`",
    ),
    ("override-typo-list-item", None, ["augment.1.factr=1"], "augment.1.factr", "Did you mean `factor`"),
    ("override-typo-in-parent", None, ["modle.hidden_dim=3"], "modle", "Did you mean `model`"),
    # deleting a missing key: no "+key" advice; a list index past the end: the list's length
    ("delete-typo", None, ["~stpes"], "stpes", "no such key in the config. Did you mean `steps`?"),
    ("list-index-past-end", None, ["augment.7.factor=1"], "augment.7", "The list has 2 entries (0 to 1)."),
    ("added-key-not-read", None, ["+stpes=3"], "stpes", "not a key the recipe reads. Did you mean `steps`"),
    (
        "added-arg-unknown",
        None,
        ["+model.dropuot=0.1"],
        "model.dropuot",
        "unknown argument for `ftcore_test_components.tiny_mlp`. Did you mean `dropout`",
    ),
    # typos at every depth, in the file
    (
        "file-typo-top",
        ("steps: 3", "setps: 3"),
        [],
        "setps",
        "not a key the recipe reads. Did you mean `steps`",
    ),
    (
        "file-typo-depth2",
        ("hidden_dim: 16", "hiden_dim: 16"),
        [],
        "model.hiden_dim",
        "Did you mean `hidden_dim`",
    ),
    (
        "file-typo-depth3",
        ("normalized_shape: ${dim}", "normalized_shape: ${dim}\n    epz: 1.0e-5"),
        [],
        "model.norm.epz",
        "unknown argument for `torch.nn.LayerNorm`. Did you mean `eps`",
    ),
    ("file-typo-list-item", ("factor: 0.5", "factr: 0.5"), [], "augment.1.factr", "Did you mean `factor`"),
    # wrong types, including strings arriving from the command line
    (
        "type-str-for-int",
        None,
        ["model.hidden_dim=sixteen"],
        "model.hidden_dim",
        "expected int, got str 'sixteen'",
    ),
    ("type-bool-for-int", None, ["model.hidden_dim=true"], "model.hidden_dim", "expected int, got bool True"),
    ("type-str-for-float", None, ["model.dropout=high"], "model.dropout", "expected float, got str 'high'"),
    (
        "type-list-for-str",
        None,
        ["+model.activation=[relu]"],
        "model.activation",
        "expected str, got list ['relu']",
    ),
    ("type-float-for-bool", None, ["+model.bias=0.5"], "model.bias", "expected bool, got float 0.5"),
    ("type-top-level", None, ["steps=2.5"], "steps", "expected int, got float 2.5"),
    ("type-top-level-dict", None, ["loss=3"], "loss", "expected dict, got int 3"),
    ("type-in-file", ("lr: 0.1", "lr: fast"), [], "optimizer.lr", "expected float or Tensor, got str 'fast'"),
    # missing required arguments
    (
        "delete-required-depth2",
        None,
        ["~model.hidden_dim"],
        "model.hidden_dim",
        "missing required argument of `ftcore_test_components.tiny_mlp`",
    ),
    (
        "delete-required-depth3",
        None,
        ["~model.norm.normalized_shape"],
        "model.norm.normalized_shape",
        "missing required argument of `torch.nn.LayerNorm`",
    ),
    (
        "delete-required-list-item",
        None,
        ["~augment.0.factor"],
        "augment.0.factor",
        "missing required argument of `ftcore_test_components.Scale`",
    ),
    ("delete-interpolated-key", None, ["~dim"], "model.in_dim", "cannot resolve interpolation"),
    ("delete-missing-key", None, ["~model.hiden_dim"], "model.hiden_dim", "Did you mean `hidden_dim`"),
    ("mandatory-unset", None, ["output_dir=???"], "output_dir", "a required value is not set (`???`)"),
    # bad dotted paths
    (
        "path-bad-attr",
        None,
        ["model=ftcore_test_components.tiny_mpl"],
        "model._component_",
        "has no `tiny_mpl`. Did you mean `tiny_mlp`",
    ),
    (
        "path-bad-torch-class",
        None,
        ["loss=torch.nn.MSELos"],
        "loss._component_",
        "`torch.nn` has no `MSELos`. Did you mean `MSELoss`",
    ),
    (
        "path-bad-module",
        None,
        ["model=ftcore_test_componets.tiny_mlp"],
        "model._component_",
        "no module named `ftcore_test_componets`",
    ),
    (
        "path-bad-submodule",
        None,
        ["loss=torch.nnn.MSELoss"],
        "loss._component_",
        "`torch` has no `nnn`. Did you mean `nn`",
    ),
    (
        "path-not-dotted",
        None,
        ["loss=torch..nn"],
        "loss._component_",
        "`torch..nn` is not a dotted Python path",
    ),
    ("path-not-callable", None, ["loss=math.pi"], "loss._component_", "`math.pi` is not callable"),
    (
        "path-broken-dependency",
        None,
        ["loss=ftcore_test_broken_import.build"],
        "loss._component_",
        "No module named 'ftcore_package_that_is_not_installed'",
    ),
    (
        "file-bad-path",
        ("torch.nn.MSELoss", "torch.nn.MSE_Loss"),
        [],
        "loss._component_",
        "Did you mean `MSELoss`",
    ),
    # malformed overrides
    ("override-no-equals", None, ["model.hidden_dim"], "model.hidden_dim", "malformed override"),
    ("override-add-existing", None, ["+steps=3"], "steps", "the key already exists. Drop the `+`"),
    ("override-delete-with-value", None, ["~steps=3"], "steps=3", "malformed delete"),
]
# malformed files: (case id, whole file text, message part)
BAD_FILES = [
    ("yaml-unclosed-list", "a: [1, 2\nb: 3\n", "malformed YAML at line 2"),
    ("yaml-bad-indent", "model:\n  a: 1\n b: 2\n", "malformed YAML at line 3"),
    ("yaml-duplicate-key", "steps: 1\nsteps: 2\n", "found duplicate key steps"),
    ("yaml-top-level-list", "- a\n- b\n", "the top level is a list"),
]


@pytest.fixture(scope="module")
def declarations(fixtures_dir_module):
    return static_declarations(fixtures_dir_module / "tiny_recipe.py")


@pytest.fixture(scope="module")
def fixtures_dir_module():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module", autouse=True)
def _warm_imports(fixtures_dir_module, declarations):
    # The first validation imports torch submodules; the timing below is of the check itself.
    validate_config(load_config(fixtures_dir_module / "tiny.yaml"), declarations.config_keys)


def test_corpus_is_large_enough():
    assert len(CORPUS) + len(BAD_FILES) >= 20
    assert len({case[0] for case in CORPUS + BAD_FILES}) == len(CORPUS) + len(BAD_FILES)


@pytest.mark.parametrize(
    ("edit", "overrides", "key", "message"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS]
)
def test_broken_config_gives_its_named_error(
    edit, overrides, key, message, tmp_path, fixtures_dir_module, declarations
):
    path = fixtures_dir_module / "tiny.yaml"
    if edit is not None:
        text = path.read_text()
        assert edit[0] in text
        path = tmp_path / "tiny.yaml"
        path.write_text(text.replace(edit[0], edit[1], 1))
    fx.BUILD_CALLS.clear()
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        cfg = apply_overrides(load_config(path), overrides, source=str(path))
        validate_config(cfg, declarations.config_keys, str(path), declarations.runtime_args)
    elapsed = time.perf_counter() - start
    assert err.value.key == key
    assert message in str(err.value)
    assert str(path) in str(err.value), "the message names the file"
    assert elapsed < 1.0, f"took {elapsed:.2f}s"
    assert fx.BUILD_CALLS == [], "nothing may be built before the config is valid"


@pytest.mark.parametrize(("text", "message"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_malformed_file_gives_its_named_error(text, message, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value) and time.perf_counter() - start < 1.0


def test_deleting_a_missing_key_does_not_advise_adding_it(fixtures_dir):
    with pytest.raises(ConfigError) as caught:
        apply_overrides(load_config(fixtures_dir / "tiny.yaml"), ["~stpes"])
    assert "To add a new key" not in str(caught.value)
