"""``template.yaml`` as CloudFormation deploys it: SAM's own translator run on it, printed as JSON.

What the translator adds (generated roles, managed policies, event source mappings) is what a deployed stack holds,
so the security tests read this rather than the SAM template. It runs in ``.venv-infra``, where the SAM CLI brings
``samtranslator``: ``.venv-infra/bin/python -m infra.sam_translate [template] > translated.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from samtranslator.internal.managed_policies import get_bundled_managed_policy_map
from samtranslator.translator.transform import transform

from infra.template import TEMPLATE_PATH, load_template


class BundledManagedPolicies:
    """The AWS managed policies' ARNs that samtranslator ships, instead of asking IAM for them."""

    def __init__(self, partition: str = "aws") -> None:
        self._partition = partition

    def load(self) -> dict[str, str]:
        return get_bundled_managed_policy_map(self._partition) or {}


PACKAGED_PROPERTIES = {"AWS::Serverless::Function": "CodeUri", "AWS::Serverless::StateMachine": "DefinitionUri"}
"""The properties naming local folders or files that ``sam package`` replaces with the S3 URIs it uploads them to."""


def packaged(template: dict[str, Any]) -> dict[str, Any]:
    """``template`` with local code and definitions replaced by S3 URIs, as ``sam package`` leaves it for deploy."""
    copy: dict[str, Any] = json.loads(json.dumps(template))
    for logical_id, resource in copy["Resources"].items():
        name = PACKAGED_PROPERTIES.get(resource["Type"])
        if name and isinstance(resource.get("Properties", {}).get(name), str):
            resource["Properties"][name] = f"s3://packaged-artifacts/{logical_id}"
    return copy


def translate(template: dict[str, Any], parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    """The CloudFormation template SAM's transform makes of ``template`` (parameters default to the template's)."""
    # The translator needs a region for the pseudo-parameters; any region gives the same statements.
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    translated: dict[str, Any] = transform(packaged(template), dict(parameters or {}), BundledManagedPolicies())
    return translated


def main(arguments: list[str]) -> None:
    path = Path(arguments[0]) if arguments else TEMPLATE_PATH
    json.dump(translate(load_template(path)), sys.stdout, indent=1, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
