"""Reading ``template.yaml``: CloudFormation's short-form tags, its conditions and the few intrinsic functions the
data-plane resources use, so local stacks and tests are built from the template itself rather than a second list."""

from __future__ import annotations

import re
from collections.abc import Mapping
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


NO_VALUE = object()
"""What ``Ref: AWS::NoValue`` resolves to: the property (or list item) holding it is left out."""


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
    conditions: Mapping[str, bool] = field(default_factory=dict)
    """Condition name -> whether it holds, for ``Fn::If``."""

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            return [item for item in (self.resolve(item) for item in value) if item is not NO_VALUE]
        if not isinstance(value, dict):
            return value
        if len(value) == 1 and next(iter(value)) in {"Ref", "Fn::If", "Fn::GetAtt", "Fn::Sub"}:
            return self._intrinsic(*next(iter(value.items())))
        resolved = {key: self.resolve(item) for key, item in value.items()}
        return {key: item for key, item in resolved.items() if item is not NO_VALUE}

    def _intrinsic(self, function: str, argument: Any) -> Any:
        """The value of one intrinsic function (NO_VALUE for ``Ref: AWS::NoValue``)."""
        if function == "Fn::If":
            name, when_true, when_false = argument
            return self.resolve(when_true if self.conditions[name] else when_false)
        if function == "Fn::GetAtt":
            logical_id, attribute = argument
            return self.attributes[(logical_id, attribute)]
        if function == "Fn::Sub":
            return self._sub(argument)
        return NO_VALUE if argument == "AWS::NoValue" else self._ref(argument)

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


def evaluate_conditions(template: dict[str, Any], parameters: Mapping[str, Any] | None = None) -> dict[str, bool]:
    """Each of the template's conditions for these parameters (the template's defaults where one is not given)."""
    values = {**parameter_defaults(template), **(parameters or {})}
    declared: dict[str, Any] = template.get("Conditions", {})
    results: dict[str, bool] = {}

    def condition(name: str) -> bool:
        if name not in results:
            results[name] = truth(declared[name])
        return results[name]

    def value(argument: Any) -> Any:
        if isinstance(argument, dict) and set(argument) == {"Ref"}:
            return values[argument["Ref"]]
        if isinstance(argument, dict):
            raise ValueError(f"unsupported value in a condition: {argument}")
        return argument

    def truth(expression: Any) -> bool:
        [(function, argument)] = expression.items()
        if function == "Condition":
            return condition(argument)
        if function == "Fn::Equals":
            left, right = (str(value(item)) for item in argument)
            return left == right
        if function == "Fn::Not":
            return not truth(argument[0])
        if function == "Fn::And":
            return all(truth(item) for item in argument)
        if function == "Fn::Or":
            return any(truth(item) for item in argument)
        raise ValueError(f"unsupported condition function {function}")

    return {name: condition(name) for name in declared}


def is_created(declaration: Mapping[str, Any], conditions: Mapping[str, bool]) -> bool:
    """Whether a resource or output exists: it names no condition, or one that holds."""
    name = declaration.get("Condition")
    return name is None or conditions[name]


def resources_of_type(
    template: dict[str, Any], resource_type: str, conditions: Mapping[str, bool] | None = None
) -> dict[str, dict[str, Any]]:
    """Logical id -> properties of every resource of one type (of those the conditions create, when given)."""
    return {
        logical_id: resource.get("Properties", {})
        for logical_id, resource in template["Resources"].items()
        if resource["Type"] == resource_type and (conditions is None or is_created(resource, conditions))
    }


def references(value: Any, conditions: Mapping[str, bool] | None = None) -> set[str]:
    """The logical ids and parameters a value names through Ref, Fn::GetAtt and Fn::Sub; with conditions, only in
    the branches of Fn::If that they choose."""
    if isinstance(value, list):
        return {name for item in value for name in references(item, conditions)}
    if not isinstance(value, dict):
        return set()
    found: set[str] = set()
    for key, argument in value.items():
        if key == "Ref" and isinstance(argument, str):
            found.add(argument)
        elif key == "Fn::GetAtt":
            found.add(argument[0] if isinstance(argument, list) else argument.split(".", 1)[0])
        elif key == "Fn::Sub":
            text, variables = (argument, {}) if isinstance(argument, str) else (argument[0], argument[1])
            named = {match.split(".", 1)[0] for match in re.findall(r"\$\{([^}!]+)\}", text)}
            found |= (named - set(variables)) | references(variables, conditions)
        elif key == "Fn::If" and conditions is not None:
            name, when_true, when_false = argument
            found |= references(when_true if conditions[name] else when_false, conditions)
        else:
            found |= references(argument, conditions)
    return {name for name in found if not name.startswith("AWS::")}
