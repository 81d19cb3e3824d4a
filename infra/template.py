"""Reading ``template.yaml``: CloudFormation's short-form tags and the few intrinsic functions the data-plane
resources use, so local stacks and tests are built from the template itself rather than a second list."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "template.yaml"


class _CloudFormationLoader(yaml.SafeLoader):
    """A YAML loader that turns ``!Ref x`` into ``{"Ref": x}`` and ``!Sub s`` into ``{"Fn::Sub": s}``."""


def _construct_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]  # Only mapping nodes remain.
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


_CloudFormationLoader.add_multi_constructor("!", _construct_tag)


def load_template(path: Path = TEMPLATE_PATH) -> dict[str, Any]:
    """The template as plain data, intrinsic functions in their long form."""
    template: dict[str, Any] = yaml.load(
        path.read_text(), Loader=_CloudFormationLoader
    )  # The loader subclasses SafeLoader.
    return template


@dataclass
class Resolver:
    """Evaluates Ref, Fn::Sub and Fn::GetAtt against parameters, pseudo-parameters and created resources."""

    parameters: dict[str, Any]
    account_id: str = "123456789012"
    region: str = "us-east-1"
    references: dict[str, Any] = field(default_factory=dict)
    """Logical id -> what ``Ref`` returns (a bucket name, a queue URL, a table name)."""
    attributes: dict[tuple[str, str], Any] = field(default_factory=dict)
    """(logical id, attribute) -> what ``Fn::GetAtt`` returns."""

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self.resolve(item) for item in value]
        if not isinstance(value, dict):
            return value
        if set(value) == {"Ref"}:
            return self._ref(value["Ref"])
        if set(value) == {"Fn::GetAtt"}:
            logical_id, attribute = value["Fn::GetAtt"]
            return self.attributes[(logical_id, attribute)]
        if set(value) == {"Fn::Sub"}:
            return self._sub(value["Fn::Sub"])
        return {key: self.resolve(item) for key, item in value.items()}

    def _ref(self, name: str) -> Any:
        pseudo = {"AWS::AccountId": self.account_id, "AWS::Region": self.region, "AWS::Partition": "aws"}
        if name in pseudo:
            return pseudo[name]
        if name in self.parameters:
            return self.parameters[name]
        return self.references[name]

    def _sub(self, argument: str | list[Any]) -> str:
        text, variables = (argument, {}) if isinstance(argument, str) else (argument[0], argument[1])

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in variables:
                return str(self.resolve(variables[name]))
            if "." in name and not name.startswith("AWS::"):
                logical_id, attribute = name.split(".", 1)
                return str(self.attributes[(logical_id, attribute)])
            return str(self._ref(name))

        return re.sub(r"\$\{([^}!]+)\}", replace, text)


def parameter_defaults(template: dict[str, Any]) -> dict[str, Any]:
    """Each template parameter's default value."""
    return {name: spec.get("Default") for name, spec in template.get("Parameters", {}).items()}


def resources_of_type(template: dict[str, Any], resource_type: str) -> dict[str, dict[str, Any]]:
    """Logical id -> properties of every resource of one type."""
    return {
        logical_id: resource.get("Properties", {})
        for logical_id, resource in template["Resources"].items()
        if resource["Type"] == resource_type
    }
