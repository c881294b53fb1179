"""SavedModel export: signatures, answers outside tfgalflow, versioning, models.config and loading.

The reference for every exported answer is the in-memory model it came from (same weights, same
rescaling, same stateless seed). "Float32 precision" below means rtol = atol = 1e-5: the exported
graph runs the same float32 ops, possibly in a different order (other thread count, TF1-session
loading in ``saved_model_cli``), so results agree to a few ulps of values of order 1-100, while a
missing rescaling, a wrong seed or a wrong version is off by O(1).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from tfgalflow.errors import FileError, InputError
from tfgalflow.export import (
    ExportedModel,
    export_model,
    export_versioned,
    load,
    read_signature_defs,
    write_models_config,
)
from tfgalflow.flows import FlowConfig
from tfgalflow.model import Ensemble, Flow
from tfgalflow.serving import Client, running
from tfgalflow.training import TrainConfig, read_run_config, train

TOL = dict(rtol=1e-5, atol=1e-5)
N_VELOCITIES = 64
BIN = Path(sys.executable).parent
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
# A plain TensorFlow user's environment: without TF_USE_LEGACY_KERAS, `import tensorflow`
# itself does not import tf_keras (with it set, TF's own import pulls tf_keras in, whatever
# the SavedModel).
PLAIN_ENV = {k: v for k, v in ENV.items() if k != "TF_USE_LEGACY_KERAS"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """root/{iso,cond,ensemble}/1: trained 6D run, conditional 3D flow, 2-member 6D ensemble."""
    tmp = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    w = rng.normal(size=(400, 6)) * [1.0, 2.0, 3.0, 40.0, 50.0, 60.0] + [
        0.0,
        1.0,
        -1.0,
        5.0,
        0.0,
        0.0,
    ]
    run_dir = tmp / "run"
    iso = train(
        w,
        TrainConfig(
            layers=2, hidden=(16, 16), epochs=3, batch_size=100, checkpoint_every=0, patience=0
        ),
        run_dir,
        verbose=0,
    )
    cond = Flow(FlowConfig(dim=3, label_dim=2, layers=2, hidden=(16, 16), seed=1))
    labels = rng.normal(size=(400, 2)) * [2.0, 0.5] + [1.0, 3.0]
    cond.adapt(w[:, :3] + labels[:, :1], labels)
    ensemble = Ensemble(
        [Flow(FlowConfig(dim=6, layers=2, hidden=(16,), seed=s)).adapt(w) for s in (3, 4)]
    )
    root = tmp / "saved_models"
    paths = {"iso": export_versioned(iso, root, "iso", run_config=read_run_config(run_dir),
                                     n_velocities=N_VELOCITIES),
             "cond": export_versioned(cond, root, "cond"),
             "ensemble": export_versioned(ensemble, root, "ensemble", accelerations=False)}
    x = {"iso": w[:50], "cond": w[:50, :3] + labels[:50, :1], "ensemble": w[:50]}
    return dict(
        tmp=tmp,
        root=root,
        run_dir=run_dir,
        paths=paths,
        models={"iso": iso, "cond": cond, "ensemble": ensemble},
        x=x,
        labels=labels[:50],
        positions=w[:8, :3].astype(np.float32),
    )


def acceleration_reference(exported, seed: int = 7) -> dict:
    """The in-memory CBE answer (tfgalflow.cbe.accelerations) at the test positions."""
    from tfgalflow.cbe import accelerations

    r = accelerations(
        exported["models"]["iso"], exported["positions"], n_velocities=N_VELOCITIES, seed=seed
    )
    return {
        "acceleration": r.acceleration,
        "residual": r.residual,
        "condition": r.condition,
        "ess": r.ess,
        "log_density": r.log_density,
    }


def assert_accelerations_match(got, ref: dict) -> None:
    if not isinstance(got, dict):  # an AccelerationResult (ExportedModel.accelerations)
        got = {
            k: getattr(got, k)
            for k in ("acceleration", "residual", "condition", "ess", "log_density")
        }
    # The 3x3 least-squares solve amplifies float32 rounding by up to its condition number; at
    # these positions cond < 10 (measured 2.1-3.5), so rtol 1e-4 (plus atol 1e-4 of the largest
    # component) is float32 precision.
    scale = np.abs(ref["acceleration"]).max()
    np.testing.assert_allclose(
        got["acceleration"], ref["acceleration"], rtol=1e-4, atol=1e-4 * scale
    )
    for key in ("residual", "condition", "ess", "log_density"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-4, atol=1e-5, err_msg=key)


def reference(exported, name: str, seed: int = 11, n: int = 50) -> dict:
    """In-memory answers: log_prob, grad_log_prob and the stateless sample with seed [seed, 0]."""
    model, x = exported["models"][name], exported["x"][name]
    labels = exported["labels"] if model.label_dim else None
    first = labels if model.label_dim else n
    return {
        "log_prob": model.log_prob(x, labels).numpy(),
        "grad_log_prob": model.grad_log_prob(x, labels).numpy(),
        "sample": model.sample_stateless(first, np.array([seed, 0])).numpy(),
    }


# ---- answers without tfgalflow ------------------------------------------------------------------

CHILD = r"""
import sys
import numpy as np
import tensorflow as tf

inputs = dict(np.load(sys.argv[1]))
results = {}
for name in ("iso", "cond", "ensemble"):
    m = tf.saved_model.load(f"{sys.argv[2]}/{name}/1")
    feed = {"x": tf.constant(inputs[name + "_x"])}
    if name == "cond":
        feed["labels"] = tf.constant(inputs["labels"])
    results[name + "_log_prob"] = m.signatures["log_prob"](**feed)["log_prob"].numpy()
    results[name + "_default"] = m.signatures["serving_default"](**feed)["log_prob"].numpy()
    grad = m.signatures["grad_log_prob"](**feed)["grad_log_prob"]
    results[name + "_grad_log_prob"] = grad.numpy()
    seed = {"seed": tf.constant(np.full(50, 11, np.int64))}
    if name == "cond":
        seed["labels"] = feed["labels"]
    results[name + "_sample"] = m.signatures["sample"](**seed)["sample"].numpy()
    results[name + "_metadata"] = np.array(m.tfgalflow_metadata.numpy().decode())
    if name == "iso":
        acc = m.signatures["accelerations"](positions=tf.constant(inputs["positions"]),
                                            seed=tf.constant(np.full(8, 7, np.int64)))
        results.update({"acc_" + k: np.char.decode(v.numpy().astype(bytes)) if v.dtype == tf.string
                        else v.numpy() for k, v in acc.items()})
imported = sorted(
    {k.split(".")[0] for k in sys.modules} & {"tensorflow_probability", "tfgalflow", "tf_keras"}
)
np.savez(sys.argv[3], imported=np.array(imported, dtype=str), **results)
"""


@pytest.mark.slow   # trains or spawns processes: make test-slow (default suite < 10 min)
def test_fresh_process_with_only_tensorflow_gives_the_same_answers(exported, tmp_path):
    inputs = {f"{k}_x": v.astype(np.float32) for k, v in exported["x"].items()}
    np.savez(
        tmp_path / "in.npz",
        labels=exported["labels"].astype(np.float32),
        positions=exported["positions"],
        **inputs,
    )
    (tmp_path / "child.py").write_text(CHILD)
    subprocess.run(
        [
            sys.executable,
            str(tmp_path / "child.py"),
            str(tmp_path / "in.npz"),
            str(exported["root"]),
            str(tmp_path / "out.npz"),
        ],
        check=True,
        env=PLAIN_ENV,
        cwd=tmp_path,
        capture_output=True,
    )
    out = np.load(tmp_path / "out.npz")
    # neither TFP, tf-keras nor tfgalflow was imported
    assert out["imported"].tolist() == []
    for name in ("iso", "cond", "ensemble"):
        ref = reference(exported, name)
        for key in ("log_prob", "grad_log_prob", "sample"):
            np.testing.assert_allclose(
                out[f"{name}_{key}"], ref[key], **TOL, err_msg=f"{name} {key}"
            )
        np.testing.assert_array_equal(out[f"{name}_default"], out[f"{name}_log_prob"])
        meta = json.loads(str(out[f"{name}_metadata"]))
        assert meta["flow"] == exported["models"][name].config.to_dict()
    meta = json.loads(str(out["iso_metadata"]))
    assert meta["run"] == read_run_config(exported["run_dir"])
    assert meta["row_wise_signatures"] == ["serving_default", "log_prob", "grad_log_prob"]
    np.testing.assert_allclose(
        meta["rescaling"][0]["x_scale"], exported["models"]["iso"].x_scale.numpy(), rtol=1e-7
    )
    assert len(json.loads(str(out["ensemble_metadata"]))["rescaling"]) == 2
    assert meta["accelerations"] == {"n_velocities": N_VELOCITIES}
    assert_accelerations_match(
        {k[4:]: out[k] for k in out.files if k.startswith("acc_")},
        acceleration_reference(exported),
    )


def test_saved_model_cli_lists_the_signatures(exported):
    shown = subprocess.run(
        [str(BIN / "saved_model_cli"), "show", "--all", "--dir", str(exported["paths"]["cond"])],
        check=True,
        env=ENV,
        capture_output=True,
        text=True,
    ).stdout
    for signature in ("serving_default", "log_prob", "grad_log_prob", "sample"):
        assert f"signature_def['{signature}']" in shown
    blocks = {b.split("']")[0]: b for b in shown.split("signature_def['")[1:]}
    assert "inputs['x']" in blocks["log_prob"] and "shape: (-1, 3)" in blocks["log_prob"]
    assert "inputs['labels']" in blocks["log_prob"] and "shape: (-1, 2)" in blocks["log_prob"]
    assert "outputs['log_prob']" in blocks["log_prob"]
    assert "outputs['grad_log_prob']" in blocks["grad_log_prob"]
    assert "inputs['seed']" in blocks["sample"] and "DT_INT64" in blocks["sample"]
    assert "outputs['sample']" in blocks["sample"]


def test_saved_model_cli_run_gives_the_same_values(exported, tmp_path):
    x = exported["x"]["iso"].astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    subprocess.run(
        [
            str(BIN / "saved_model_cli"),
            "run",
            "--dir",
            str(exported["paths"]["iso"]),
            "--tag_set",
            "serve",
            "--signature_def",
            "log_prob",
            "--inputs",
            f"x={tmp_path / 'x.npy'}",
            "--outdir",
            str(tmp_path / "out"),
        ],
        check=True,
        env=ENV,
        capture_output=True,
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "out" / "log_prob.npy"), reference(exported, "iso")["log_prob"], **TOL
    )


def test_rest_endpoint_gives_the_same_values(exported):
    with running(exported["root"]) as server:
        for name in ("iso", "cond", "ensemble"):
            ref, client = reference(exported, name), Client(server.url, model=name)
            inputs = {"x": exported["x"][name]}
            seeds = {"seed": np.full(50, 11)}
            if name == "cond":
                inputs["labels"] = seeds["labels"] = exported["labels"]
            np.testing.assert_allclose(client.predict(inputs), ref["log_prob"], **TOL)
            np.testing.assert_allclose(
                client.predict(inputs, "grad_log_prob", format="columns"),
                ref["grad_log_prob"],
                **TOL,
            )
            np.testing.assert_allclose(client.predict(seeds, "sample"), ref["sample"], **TOL)
        accelerations = Client(server.url, model="iso").predict(
            {"positions": exported["positions"], "seed": np.full(8, 7)},
            "accelerations",
            format="columns",
        )
        assert_accelerations_match(accelerations, acceleration_reference(exported))
        assert accelerations["support"].dtype == bool and accelerations["support"].all()
        status = Client(server.url, model="iso").status()["model_version_status"]
        assert [s["version"] for s in status] == ["1"]


def test_exported_graph_has_no_xla_even_from_a_jit_compiled_flow(exported, tmp_path):
    flow = Flow(FlowConfig(dim=2, layers=2, hidden=(8,)), jit_compile=True).adapt(
        np.random.default_rng(1).normal(size=(50, 2))
    )
    path = export_model(flow, tmp_path / "jit")
    from tensorflow.core.protobuf import saved_model_pb2
    proto = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
    library = proto.meta_graphs[0].graph_def.library.function
    assert not [f.signature.name for f in library if f.attr["_XlaMustCompile"].b]
    assert not [n.name for f in library for n in f.node_def if n.attr["_XlaMustCompile"].b]
    x = np.array([[0.1, -0.3], [1.0, 2.0]])
    np.testing.assert_allclose(load(path).log_prob(x), flow.log_prob(x).numpy(), **TOL)


# ---- load ---------------------------------------------------------------------------------------

def test_load_saved_model_numpy_in_and_out(exported):
    model = load(exported["paths"]["cond"])
    assert isinstance(model, ExportedModel) and (model.dim, model.label_dim) == (3, 2)
    ref = reference(exported, "cond")
    lp = model.log_prob(exported["x"]["cond"], exported["labels"])
    assert isinstance(lp, np.ndarray) and lp.dtype == np.float32
    np.testing.assert_allclose(lp, ref["log_prob"], **TOL)
    np.testing.assert_allclose(
        model.prob(exported["x"]["cond"], exported["labels"]), np.exp(ref["log_prob"]), **TOL
    )
    np.testing.assert_allclose(
        model.grad_log_prob(exported["x"]["cond"], exported["labels"]), ref["grad_log_prob"], **TOL
    )
    np.testing.assert_allclose(model.sample(50, exported["labels"], seed=11), ref["sample"], **TOL)
    # [C] labels: every draw at that label
    one_label = model.sample(4, exported["labels"][0], seed=2)
    np.testing.assert_allclose(one_label, exported["models"]["cond"].sample_stateless(
        np.tile(exported["labels"][:1], (4, 1)), np.array([2, 0])).numpy(), **TOL)
    iso = load(exported["paths"]["iso"])
    np.testing.assert_allclose(
        iso.sample(30, seed=5),
        exported["models"]["iso"].sample_stateless(30, np.array([5, 0])),
        **TOL,
    )
    assert not np.allclose(iso.sample(30, seed=5), iso.sample(30, seed=6))


def test_loaded_saved_model_is_a_df_for_the_cbe(exported):
    """cbe.accelerations / df_gradients accept a loaded SavedModel (traced through its log_prob
    function) and give the in-memory model's answers; the same seed draws the same velocities in
    both."""
    from tfgalflow.cbe import accelerations, df_gradients
    model = load(exported["paths"]["iso"])
    r = accelerations(model, exported["positions"], n_velocities=N_VELOCITIES, seed=7)
    got = {
        "acceleration": r.acceleration,
        "residual": r.residual,
        "condition": r.condition,
        "ess": r.ess,
        "log_density": r.log_density,
    }
    assert_accelerations_match(got, acceleration_reference(exported))
    w = exported["x"]["iso"]
    g_x, g_v = df_gradients(model, w[:, :3], w[:, 3:])
    np.testing.assert_allclose(np.concatenate([g_x, g_v], axis=1),
                               exported["models"]["iso"].grad_log_prob(w).numpy(), **TOL)


def test_load_run_directory_and_model_directory(exported, tmp_path):
    from_run = load(exported["run_dir"])
    assert isinstance(from_run, Flow)
    np.testing.assert_allclose(
        from_run.log_prob(exported["x"]["iso"]).numpy(),
        reference(exported, "iso")["log_prob"],
        **TOL,
    )
    model_dir = tmp_path / "iso"
    shutil.copytree(exported["root"] / "iso" / "1", model_dir / "1")
    shutil.copytree(exported["root"] / "ensemble" / "1", model_dir / "2")  # highest version wins
    np.testing.assert_allclose(
        load(model_dir).log_prob(exported["x"]["iso"]),
        reference(exported, "ensemble")["log_prob"],
        **TOL,
    )


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda m: m.log_prob(np.zeros((2, 5))),
            "input 'x' has shape [2, 5]; expected [N, 6] float32",
        ),
        (lambda m: m.log_prob(np.array([[0, 0, 0, 0, 0, np.nan]])), "NaN or infinite"),
        (lambda m: m.log_prob(np.zeros((1, 6)), labels=np.zeros((1, 2))), "unconditional"),
        (lambda m: m.grad_log_prob([[1, 2, 3]]), "expected [N, 6]"),
        (lambda m: m.sample(0), "n = 0"),
        (lambda m: m.sample(3, seed=-1), "seed = -1"),
    ],
)
def test_load_validates_inputs(exported, call, message):
    with pytest.raises(InputError) as info:
        call(load(exported["paths"]["iso"]))
    assert message in str(info.value)


def test_load_conditional_needs_labels(exported):
    model = load(exported["paths"]["cond"])
    with pytest.raises(InputError, match="conditional"):
        model.log_prob(exported["x"]["cond"])
    with pytest.raises(InputError, match=r"labels have shape \[3, 3\]"):
        model.sample(3, np.zeros((3, 3)))
    # 2 rows of x, 1 of labels
    with pytest.raises(InputError, match="same number of rows"):
        model.log_prob(np.zeros((2, 3)), np.zeros((1, 2)))
    # only 6D unconditional models
    with pytest.raises(InputError, match="no 'accelerations' signature"):
        model.accelerations(np.zeros((2, 3)))


def test_load_rejects_what_is_not_a_tfgalflow_saved_model(tmp_path):
    with pytest.raises(FileError, match="no such file"):
        load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileError, match="neither a SavedModel"):
        load(tmp_path / "empty")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "saved_model.pb").write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(FileError, match="not a readable SavedModel"):
        load(tmp_path / "corrupt")
    module = tf.Module()
    module.f = tf.function(
        lambda x: {"y": 2 * x}, input_signature=[tf.TensorSpec([None], tf.float32, name="x")]
    )
    tf.saved_model.save(module, str(tmp_path / "other"), signatures={"serving_default": module.f})
    with pytest.raises(FileError, match="missing signature.*log_prob"):
        load(tmp_path / "other")
    shutil.copytree(tmp_path / "other", tmp_path / "novars")
    shutil.rmtree(tmp_path / "novars" / "variables")
    (tmp_path / "novars" / "variables").mkdir()
    (tmp_path / "novars" / "variables" / "variables.index").write_bytes(b"junk")
    with pytest.raises(FileError, match="cannot be loaded"):
        ExportedModel(tmp_path / "novars")


# ---- versioned layout and models.config ---------------------------------------------------------

def test_export_versioned_never_overwrites(exported, tmp_path):
    flow = exported["models"]["cond"]
    first = export_versioned(flow, tmp_path, "m")
    stamp = (first / "saved_model.pb").read_bytes()
    assert first == tmp_path / "m" / "1"
    (tmp_path / "m" / "7").mkdir()                      # any integer entry counts as taken
    assert export_versioned(flow, tmp_path, "m") == tmp_path / "m" / "8"
    assert (first / "saved_model.pb").read_bytes() == stamp
    with pytest.raises(FileError, match="refusing to overwrite"):
        export_model(flow, first)
    assert (first / "saved_model.pb").read_bytes() == stamp
    # no temp dirs left
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "7", "8"]
    with pytest.raises(InputError, match="model name"):
        export_versioned(flow, tmp_path, "../escape")


def test_failed_export_leaves_nothing_behind(exported, tmp_path, monkeypatch):
    def fail(module, path, signatures=None):
        (Path(path) / "saved_model.pb").write_bytes(b"partial")
        raise RuntimeError("disk full")
    monkeypatch.setattr(tf.saved_model, "save", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(exported["models"]["cond"], tmp_path / "m" / "1")
    assert list((tmp_path / "m").iterdir()) == []


def _model_server_config_class():
    """ModelServerConfig built from the field names and numbers of TF Serving's protos
    (tensorflow_serving/config/model_server_config.proto,
    .../file_system_storage_path_source.proto)."""
    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="tfs_model_server_config.proto", package="tensorflow.serving", syntax="proto3"
    )
    policy = proto.message_type.add(name="ServableVersionPolicy")
    policy.nested_type.add(name="Latest").field.add(
        name="num_versions", number=1, type=F.TYPE_UINT32, label=F.LABEL_OPTIONAL
    )
    policy.nested_type.add(name="All")
    policy.nested_type.add(name="Specific").field.add(name="versions", number=1, type=F.TYPE_INT64,
                                                     label=F.LABEL_REPEATED)
    policy.oneof_decl.add(name="policy_choice")
    for name, number, kind in (
        ("latest", 100, "Latest"),
        ("all", 101, "All"),
        ("specific", 102, "Specific"),
    ):
        policy.field.add(
            name=name,
            number=number,
            type=F.TYPE_MESSAGE,
            label=F.LABEL_OPTIONAL,
            oneof_index=0,
            type_name=f".tensorflow.serving.ServableVersionPolicy.{kind}",
        )
    config = proto.message_type.add(name="ModelConfig")
    for name, number in (("name", 1), ("base_path", 2), ("model_platform", 4)):
        config.field.add(name=name, number=number, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    config.field.add(
        name="model_version_policy",
        number=7,
        type=F.TYPE_MESSAGE,
        label=F.LABEL_OPTIONAL,
        type_name=".tensorflow.serving.ServableVersionPolicy",
    )
    proto.message_type.add(name="ModelConfigList").field.add(
        name="config",
        number=1,
        type=F.TYPE_MESSAGE,
        label=F.LABEL_REPEATED,
        type_name=".tensorflow.serving.ModelConfig",
    )
    proto.message_type.add(name="ModelServerConfig").field.add(
        name="model_config_list", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
        type_name=".tensorflow.serving.ModelConfigList")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.ModelServerConfig")
    )


def test_models_config_is_valid_model_server_config_text(exported, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(exported["root"], root)
    (root / "notes").mkdir()                                # no versions: not a model
    (root / "iso" / "2-draft").mkdir()                      # not an integer version: ignored
    message = _model_server_config_class()()
    text_format.Parse(write_models_config(root).read_text(), message)
    configs = message.model_config_list.config
    assert [c.name for c in configs] == ["cond", "ensemble", "iso"]
    # Default: the container's /models, never a path of the host that wrote the file
    # (issue #11.10).
    assert [c.base_path for c in configs] == ["/models/cond", "/models/ensemble", "/models/iso"]
    text_format.Parse(write_models_config(root, base_path=str(root.resolve())).read_text(),
                      host := _model_server_config_class()())
    assert [c.base_path for c in host.model_config_list.config] == [
        str((root / n).resolve()) for n in ("cond", "ensemble", "iso")]
    assert {c.model_platform for c in configs} == {"tensorflow"}
    assert all(c.model_version_policy.WhichOneof("policy_choice") == "all" for c in configs)
    text_format.Parse(
        write_models_config(root, base_path="/models/", version_policy="latest").read_text(),
        message := _model_server_config_class()(),
    )
    assert [c.base_path for c in message.model_config_list.config] == [
        "/models/cond",
        "/models/ensemble",
        "/models/iso",
    ]
    assert message.model_config_list.config[0].model_version_policy.latest.num_versions == 1
    # written atomically
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []


def test_accelerations_signature_only_for_6d_unconditional_models(exported):
    iso, cond, ensemble = (
        read_signature_defs(exported["paths"][k]) for k in ("iso", "cond", "ensemble")
    )
    acc = iso["accelerations"]
    assert [d["size"] for d in acc["inputs"]["positions"]["tensor_shape"]["dim"]] == ["-1", "3"]
    assert acc["inputs"]["seed"]["dtype"] == "DT_INT64"
    assert {"acceleration", "residual", "condition"} <= set(acc["outputs"])
    # cond is 3D, ensemble was exported with accelerations=False
    assert "accelerations" not in cond and "accelerations" not in ensemble
    with pytest.raises(InputError, match="unconditional 6D"):
        export_model(exported["models"]["cond"], exported["tmp"] / "never", accelerations=True)
    assert not (exported["tmp"] / "never").exists()
    model = load(exported["paths"]["iso"])
    assert_accelerations_match(
        model.accelerations(exported["positions"], seed=7), acceleration_reference(exported)
    )
    other_seed = model.accelerations(exported["positions"], seed=8).acceleration
    assert not np.allclose(other_seed, acceleration_reference(exported)["acceleration"], rtol=1e-4)


def test_signature_defs_json_matches_saved_model(exported):
    defs = read_signature_defs(exported["paths"]["iso"])
    assert defs["sample"]["inputs"]["seed"]["dtype"] == "DT_INT64"
    assert defs["sample"]["inputs"]["seed"]["tensor_shape"]["dim"] == [{"size": "-1", "name": ""}]
    assert [
        d["size"] for d in defs["grad_log_prob"]["outputs"]["grad_log_prob"]["tensor_shape"]["dim"]
    ] == ["-1", "6"]


# ---- CLI ----------------------------------------------------------------------------------------

def test_shipped_models_config_is_what_export_writes(tmp_path):
    # The tracked saved_models/models.config must be what `tfgalflow export` regenerates, so an
    # export never leaves the README's docker command pointing at paths of the exporting host.
    shipped = Path(__file__).resolve().parents[1] / "saved_models"
    copy = shutil.copytree(shipped, tmp_path / "saved_models")
    (copy / "models.config").unlink()
    assert write_models_config(copy).read_text() == (shipped / "models.config").read_text()


@pytest.mark.slow   # trains or spawns processes: make test-slow (default suite < 10 min)
def test_cli_export_prints_the_version_and_regenerates_models_config(exported, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "tfgalflow.cli",
        "export",
        str(exported["run_dir"]),
        "--name",
        "hernquist_iso",
        # --base-path: /models by default
        "--out",
        str(tmp_path / "saved_models"),
    ]
    for version, flags in ((1, ["--n-velocities", "32"]), (2, ["--no-accelerations"])):
        done = subprocess.run(cmd + flags, env=ENV, capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == str(
            tmp_path / "saved_models" / "hernquist_iso" / str(version)
        )
    v1, v2 = (
        read_signature_defs(tmp_path / "saved_models" / "hernquist_iso" / v) for v in ("1", "2")
    )
    assert "accelerations" in v1 and "accelerations" not in v2
    assert load(tmp_path / "saved_models" / "hernquist_iso" / "1").metadata["accelerations"] == {
        "n_velocities": 32
    }
    text = (tmp_path / "saved_models" / "models.config").read_text()
    assert 'name: "hernquist_iso"' in text and 'base_path: "/models/hernquist_iso"' in text
    x = exported["x"]["iso"]
    np.testing.assert_allclose(load(tmp_path / "saved_models" / "hernquist_iso" / "2").log_prob(x),
                               reference(exported, "iso")["log_prob"], **TOL)
    bad = subprocess.run(
        cmd[:4] + [str(tmp_path / "nowhere")] + cmd[5:], env=ENV, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "not a tfgalflow run directory" in bad.stderr


@pytest.mark.slow          # ~13 s; the contract exports a spherical average too
def test_export_of_a_spherical_average_answers_for_the_averaged_df(exported, tmp_path):
    """`tfgalflow export RUN --rotations M`: every signature is the rotation-averaged DF's (same
    rotations as SphericalAverage(model, M) in memory), and the metadata says so."""
    from tfgalflow.cbe import accelerations
    from tfgalflow.cli import main
    from tfgalflow.symmetry import SphericalAverage

    assert (
        main(
            [
                "export",
                str(exported["run_dir"]),
                "--name",
                "iso_spherical",
                "--out",
                str(tmp_path),
                "--rotations",
                "4",
                "--n-velocities",
                str(N_VELOCITIES),
            ]
        )
        == 0
    )
    model = load(tmp_path / "iso_spherical" / "1")
    avg = SphericalAverage(exported["models"]["iso"], 4)
    x = exported["x"]["iso"]
    assert model.metadata["spherical_average"] == {"n_rotations": 4, "seed": 0}
    assert model.metadata["flow"] == exported["models"]["iso"].config.to_dict()
    np.testing.assert_allclose(model.log_prob(x), avg.log_prob(x).numpy(), **TOL)
    np.testing.assert_allclose(model.grad_log_prob(x), avg.grad_log_prob(x).numpy(), **TOL)
    # the export is the rotation average, not the bare flow
    assert np.abs(model.log_prob(x) - exported["models"]["iso"].log_prob(x).numpy()).max() > 1e-3
    np.testing.assert_allclose(
        model.sample(20, seed=3), avg.sample_stateless(20, np.array([3, 0])).numpy(), **TOL
    )
    r = accelerations(avg, exported["positions"], n_velocities=N_VELOCITIES, seed=7)
    assert_accelerations_match(
        model.accelerations(exported["positions"], seed=7),
        {
            "acceleration": r.acceleration,
            "residual": r.residual,
            "condition": r.condition,
            "ess": r.ess,
            "log_density": r.log_density,
        },
    )
    assert load(exported["paths"]["iso"]).metadata["spherical_average"] is None
    # A loaded SavedModel under a SphericalAverage stays on the plain graph even when XLA is
    # asked for (its function inlined under XLA would recompile on every call): same answers
    # as the in-memory average.
    r_loaded = accelerations(
        SphericalAverage(load(exported["paths"]["iso"]), 4),
        exported["positions"],
        n_velocities=N_VELOCITIES,
        seed=7,
        jit_compile=True,
    )
    assert not SphericalAverage(load(exported["paths"]["iso"]), 4).inlinable and avg.inlinable
    assert_accelerations_match(
        {
            "acceleration": r_loaded.acceleration,
            "residual": r_loaded.residual,
            "condition": r_loaded.condition,
            "ess": r_loaded.ess,
            "log_density": r_loaded.log_density,
        },
        {
            "acceleration": r.acceleration,
            "residual": r.residual,
            "condition": r.condition,
            "ess": r.ess,
            "log_density": r.log_density,
        },
    )
    assert (
        main(
            [
                "export",
                str(exported["run_dir"]),
                "--name",
                "x",
                "--out",
                str(tmp_path),
                "--rotations",
                "-2",
            ]
        )
        == 2
    )


# ---- accelerations of a conditional 6D model ------------------------------------------------

KEYS = ("acceleration", "residual", "condition", "ess", "log_density")


@pytest.fixture(scope="module")
def conditional_6d(tmp_path_factory):
    """root/cond6/1: a small conditional 6D flow f(x, v | c) (C = 1), with accelerations."""
    rng = np.random.default_rng(2)
    c = rng.uniform(0.5, 2.0, size=(1000, 1))
    w = rng.normal(size=(1000, 6)) * np.concatenate([c, c, c, 1 / c, 1 / c, 1 / c], 1)
    flow = Flow(FlowConfig(dim=6, label_dim=1, layers=2, hidden=(16, 16), seed=5)).adapt(w, c)
    root = tmp_path_factory.mktemp("cond6")
    path = export_versioned(flow, root, "cond6", n_velocities=32)
    positions = rng.normal(size=(6, 3)).astype(np.float32)
    return dict(flow=flow, root=root, path=path, positions=positions,
                labels=np.linspace(0.6, 1.8, 6)[:, None].astype(np.float32))


def test_conditional_6d_model_exports_accelerations_with_labels(conditional_6d):
    from tfgalflow.cbe import accelerations

    acc = read_signature_defs(conditional_6d["path"])["accelerations"]
    assert sorted(acc["inputs"]) == ["labels", "positions", "seed"]
    assert [d["size"] for d in acc["inputs"]["labels"]["tensor_shape"]["dim"]] == ["-1", "1"]
    model = load(conditional_6d["path"])
    x, labels, flow = conditional_6d["positions"], conditional_6d["labels"], conditional_6d["flow"]
    # The same graph as the in-memory chain, same seeds and labels: equal to the last bit (as the
    # unconditional export test in test_cbe.py).
    got = model.accelerations(x, seed=4, labels=labels)
    want = accelerations(flow, x, 32, seed=4, labels=labels)
    np.testing.assert_array_equal(got.acceleration, want.acceleration.astype(np.float32))
    np.testing.assert_array_equal(got.reasons, want.reasons)
    # Labels [C]: one label for every position, as in memory.
    np.testing.assert_array_equal(model.accelerations(x, seed=4, labels=[1.2]).acceleration,
                                  accelerations(flow, x, 32, seed=4, labels=[1.2]).acceleration
                                  .astype(np.float32))
    # A loaded conditional SavedModel is itself a conditional DF for the CBE (plain graph).
    loaded = accelerations(model, x, 32, seed=4, labels=labels)
    assert_accelerations_match(loaded, {k: getattr(want, k) for k in KEYS})
    for bad, message in ((None, "conditional"), (np.ones((5, 1)), r"\[5, 1\]"),
                         (np.ones((6, 2)), r"\[6, 2\]")):
        with pytest.raises(InputError, match=message):
            model.accelerations(x, seed=4, labels=bad)
    # The signature itself refuses rows that do not match (REST clients bypass the Python checks).
    with pytest.raises(InputError, match="same number of rows"):
        model.signatures["accelerations"](positions=x, seed=np.zeros(6, np.int64),
                                          labels=labels[:5])


def test_rest_endpoint_serves_conditional_accelerations(conditional_6d):
    from tfgalflow.cbe import accelerations

    x, labels = conditional_6d["positions"], conditional_6d["labels"]
    ref = accelerations(conditional_6d["flow"], x, 32, seed=7, labels=labels)
    with running(conditional_6d["root"]) as server:
        out = Client(server.url, model="cond6").predict({"positions": x, "labels": labels,
                                                          "seed": np.full(6, 7)}, "accelerations",
                                                         format="columns")
    assert_accelerations_match(out, {k: getattr(ref, k) for k in KEYS})


def test_exported_accelerations_carry_the_python_flags(tmp_path):
    # A served answer must say why a number is not to be trusted, exactly as the Python API does: a
    # position where the DF has no support (x_0 < 0 is outside a log column), one far outside the
    # data (a flow has tiny but finite density there: few effective velocities) and normal ones.
    from tfgalflow.cbe import accelerations

    rng = np.random.default_rng(3)
    w = rng.normal(size=(2000, 6)) * 0.3
    w[:, 0] = np.exp(rng.normal(size=2000) * 0.3)
    flow = Flow(FlowConfig(dim=6, layers=2, hidden=(16, 16), log_columns=(0,), seed=2)).adapt(w)
    path = export_model(flow, tmp_path / "m", n_velocities=32)
    x = np.array(
        [[1.0, 0.1, 0.0], [-1.0, 0.0, 0.0], [1e3, 5e2, 0.0], [1.2, -0.2, 0.1]], np.float32
    )
    raw = load(path).signatures["accelerations"](positions=x, seed=np.full(4, 5, np.int64))
    want = accelerations(flow, x, 32, seed=5)
    np.testing.assert_array_equal(raw["reasons"], want.reasons)
    np.testing.assert_array_equal(raw["flagged"], want.flagged)
    assert "no_support" in raw["reasons"][1] and np.isnan(raw["acceleration"][1]).all()
    assert raw["flagged"][2] and not raw["flagged"][0]
    np.testing.assert_array_equal(np.isnan(raw["acceleration"]), np.isnan(want.acceleration))


@pytest.mark.slow          # two exports (~11 s); rebuild_model has fast tests too
def test_a_savedmodel_rebuilds_and_exports_again(exported, tmp_path, capsys):
    # rebuild_model maps the saved variables back onto the recorded FlowConfig: the same densities
    # to the last bit, for a flow and an ensemble, and `export SAVEDMODEL` writes it with this
    # version's signatures (the accelerations flags among them).
    from tfgalflow.cli import main
    from tfgalflow.export import rebuild_model

    for name in ("iso", "ensemble"):
        model = rebuild_model(exported["paths"][name])
        assert type(model) is type(exported["models"][name])
        x = exported["x"][name]
        np.testing.assert_array_equal(model.log_prob(x).numpy(),
                                      exported["models"][name].log_prob(x).numpy())
    assert main(["export", str(exported["paths"]["iso"]), "--name", "again", "--out",
                 str(tmp_path)]) == 0
    again = load(tmp_path / "again" / "1")
    assert {"flagged", "reasons"} <= set(again.signatures["accelerations"].outputs)
    assert again.metadata["run"] == load(exported["paths"]["iso"]).metadata["run"]
    with pytest.raises(FileError, match="not a tfgalflow SavedModel|no such file"):
        rebuild_model(tmp_path / "nowhere")
