import pytest
from pydantic import ValidationError

from resumable.errors import UnknownRecipe
from resumable.recipes import load_recipe
from resumable.spec import CheckpointPolicy, TrainingSpec


@pytest.mark.parametrize(
    "fields",
    [
        {"epochs": 0},
        {"epochs": -3},
        {"epochs": 10**9},
        {"batch_size": 0},
        {"batch_size": 10**9},
        {"learning_rate": -0.1},
        {"learning_rate": float("nan")},
        {"device": "tpu"},
        {"seed": -1},
        {"recipe": ""},
        {"unknown_field": 1},
        {"recipe_options": {"x": float("inf")}},
    ],
)
def test_spec_refuses_absurd_values(fields: dict) -> None:
    with pytest.raises(ValidationError):
        TrainingSpec.model_validate({"recipe": "tiny", "epochs": 2, **fields})


@pytest.mark.parametrize(
    "fields",
    [
        {"every_epochs": 0},
        {"every_seconds": -5},
        {"every_seconds": 0.01},
        {"keep_last": 0},
    ],
)
def test_checkpoint_policy_refuses_absurd_intervals(fields: dict) -> None:
    with pytest.raises(ValidationError):
        CheckpointPolicy.model_validate(fields)


def test_fingerprint_ignores_epochs_device_and_policy_but_not_seed() -> None:
    base = TrainingSpec(recipe="tiny", epochs=2)
    assert (
        base.fingerprint()
        == base.model_copy(update={"epochs": 9, "device": "cpu"}).fingerprint()
    )
    assert (
        base.fingerprint()
        == base.model_copy(
            update={"checkpoint": CheckpointPolicy(keep_last=9)}
        ).fingerprint()
    )
    assert base.fingerprint() != base.model_copy(update={"seed": 1}).fingerprint()


def test_differences_name_each_changed_field() -> None:
    old = TrainingSpec(recipe="tiny", epochs=2, batch_size=8)
    new = TrainingSpec(recipe="tiny", epochs=2, batch_size=16, seed=4)
    differences = new.differences_from(old.model_dump(mode="json"))
    assert [d.split(":")[0] for d in differences] == ["seed", "batch_size"]


def test_unknown_recipe_names_the_shipped_ones() -> None:
    with pytest.raises(UnknownRecipe, match="tiny"):
        load_recipe("no-such-recipe")


def test_recipe_by_import_path_with_options() -> None:
    recipe = load_recipe("resumable.recipes.tiny:TinyRecipe", {"hidden": 4})
    model = recipe.build_model(TrainingSpec(recipe="tiny", epochs=1))
    assert model[0].out_features == 4


@pytest.mark.parametrize(
    "path", ["os:getcwd", "resumable.recipes.tiny:Missing", "no_such_module:f"]
)
def test_recipe_path_that_is_not_a_recipe_is_refused(path: str) -> None:
    with pytest.raises(UnknownRecipe):
        load_recipe(path)


def test_recipe_refusing_its_options_is_reported() -> None:
    with pytest.raises(UnknownRecipe, match="refused its options"):
        load_recipe("tiny", {"no_such_option": 1})
