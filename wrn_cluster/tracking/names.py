"""Registry names checked before training: tracking.registered_model and tracking.alias as the
Model Registry will judge them, so a bad name fails in preflight, not after hours of training."""

from __future__ import annotations


def registry_name_problems(name: str, alias: str) -> list[str]:
    """Why tracking.registered_model or tracking.alias would be refused by the registry (its own
    rules), or break `models:/NAME@ALIAS` URIs; empty when both are usable."""
    problems = []
    refusal = model_name_refusal(name)
    if refusal is None and "@" in name:
        refusal = f"'{name}' holds '@', which models:/NAME@ALIAS URIs split on"
    if refusal:
        problems.append(
            f"tracking.registered_model: {refusal.rstrip('.')}; use letters, digits, '_', "
            "'-' and '.', e.g. wrn28_10_cifar10"
        )
    refusal = alias_refusal(alias)
    if refusal:
        problems.append(
            f"tracking.alias: {refusal.rstrip('.')}; use letters, digits, '_' and '-', "
            "e.g. champion"
        )
    return problems


# The adapter over MLflow's private validators: MLflow has no public way to ask whether a name
# is valid, and its server refuses names with these same checks.
# tests/unit/test_tracking_adapters.py pins what they accept and say, so an MLflow upgrade that
# changes them fails there first.


def model_name_refusal(name: str) -> str | None:
    """MLflow's reason to refuse ``name`` for a registered model, else None."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils import validation

    try:
        validation._validate_model_name(name)
    except MlflowException as error:
        return error.message
    return None


def alias_refusal(alias: str) -> str | None:
    """MLflow's reason to refuse ``alias`` for a model version (bad characters, too long, or
    reserved: 'latest' and 'v<number>'), else None."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils import validation

    try:
        validation._validate_model_alias_name(alias)
        validation._validate_model_alias_name_reserved(alias)
    except MlflowException as error:
        return error.message
    return None
