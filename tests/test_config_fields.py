"""The config-field contract (tfgalflow.config_fields) over every config dataclass that uses it."""
import numpy as np
import pytest

from tfgalflow.config_fields import KINDS, coerce
from tfgalflow.errors import InputError
from tfgalflow.interpolation_study import InterpolationConfig
from tfgalflow.tasks import TASKS
from tfgalflow.training import TrainConfig

CONFIGS = [TrainConfig, InterpolationConfig] + [task.config_type for task in TASKS.values()]


def as_text(kind: str, value) -> str:
    """What a user types on the command line for ``value`` (independent of the parser)."""
    if value is None:
        return "none"
    if kind == "bool":
        return "true" if value else "false"
    if kind in ("pairs", "pairs?"):
        return ",".join(f"{g!r}:{k!r}" for g, k in value) or "none"
    if kind in ("ints", "floats"):
        return ",".join(repr(v) for v in value)
    return repr(value) if kind in ("float", "float?") else str(value)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
class TestConfigFields:
    def test_every_field_has_a_known_kind_and_help(self, cls):
        for name, (kind, text) in cls.field_help().items():
            assert kind in KINDS, (name, kind)
            assert text.strip(), name

    def test_command_line_text_of_the_defaults_rebuilds_the_defaults(self, cls):
        default = cls()
        text = {name: as_text(kind, getattr(default, name))
                for name, (kind, _) in cls.field_help().items()}
        assert cls().with_overrides(**text) == default

    def test_unparseable_value_names_owner_field_and_expectation(self, cls):
        name, (kind, _) = next((n, k) for n, k in cls.field_help().items()
                               if k[0] in ("int", "float"))
        with pytest.raises(InputError, match=rf"{cls.__name__}\.{name} = 'x': expected a"):
            cls().with_overrides(**{name: "x"})

    def test_unknown_keys_are_named_with_the_allowed_ones(self, cls):
        # from_dict and with_overrides both refuse a misspelt field, naming it and every field
        first = next(iter(cls.field_help()))
        for build in (cls.from_dict, lambda d: cls().with_overrides(**d)):
            with pytest.raises(InputError, match=rf"unknown key\(s\) \['nosuchfield'\]; "
                                                 rf"allowed: \[.*'{first}'"):
                build({"nosuchfield": 1})
        with pytest.raises(InputError, match=f"{cls.__name__}: expected a mapping"):
            cls.from_dict([("layers", 2)])


@pytest.mark.parametrize("kind, value, expected", [
    ("int", "1e6", 1_000_000), ("int", np.int64(3), 3), ("int", 4.0, 4),
    ("float", " 2e-3 ", 2e-3), ("float?", "None", None), ("int?", "", None),
    ("bool", "Yes", True), ("bool", "off", False), ("bool", np.bool_(True), True),
    ("ints", "64, 64", (64, 64)), ("ints", 32, (32,)), ("ints", "", ()),
    ("floats", "0.5,1", (0.5, 1.0)),
    ("pairs", "0.75:0.25,1.25:0.75", ((0.75, 0.25), (1.25, 0.75))),
    ("pairs", [[1, 0.5]], ((1.0, 0.5),)), ("str", "tanh", "tanh"),
    ("pairs?", "none", ()), ("pairs?", "", ()), ("pairs?", (), ()),
    ("pairs?", "1:0.01", ((1.0, 0.01),)),
])
def test_coerce_parses(kind, value, expected):
    assert coerce("C", "f", kind, value) == expected


@pytest.mark.parametrize("kind, value, expected", [
    ("int", "2.5", "an integer"), ("int", True, "an integer"), ("float", "nan", "a number"),
    ("float", "inf", "a number"), ("float", False, "a number"), ("bool", "2", "true or false"),
    ("str", 3, "a string"), ("ints", "64,x", "an integer"), ("floats", "", "numbers like"),
    ("pairs", "1;0.5", "label pairs"), ("pairs", "1:2:3", "label pairs"),
    ("pairs", "", "label pairs"), ("pairs?", "1", "pairs like 1:0.01"),
])
def test_coerce_refuses(kind, value, expected):
    with pytest.raises(InputError, match=rf"^C\.f = .*: expected {expected}"):
        coerce("C", "f", kind, value)

