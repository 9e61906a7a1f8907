"""beam_options/*.yaml -> Beam flags (pipeline/beam_yaml.py), resource hints on the model stages, and
the live progress line of local runs (pipeline/progress.py).

The Dataflow, Spark and Flink runners cannot run here (no cloud, no job-server jars), so for them
the job's graph is built with each file's options and translated to the runner API proto, never
run. The DirectRunner files run a real (small) pipeline.
"""

import io
import socket
import time
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import DebugOptions, DirectOptions, PipelineOptions, StandardOptions, WorkerOptions

from pipeline.beam_yaml import (
    MODEL_STAGE_LABELS,
    OptionsFileError,
    hinted,
    load_options_file,
    merge_beam_args,
    model_stage_hints,
    placeholders,
    transform_resource_hints,
)
from pipeline.config import ConfigError, ModelsConfig, config_from_namespace, prepare_parser
from pipeline.testbed import prepare_config
from pipeline.progress import LocalProgress, ProgressPrinter, format_line, read_taps, runs_locally, tap, tap_all

REPO = Path(__file__).resolve().parents[2]
OPTIONS = REPO / "beam_options"
EXPECTED_RUNNER = {
    "direct.yaml": "DirectRunner",
    "direct-multiprocess.yaml": "DirectRunner",
    "dataflow.yaml": "DataflowRunner",
    "spark.yaml": "PortableRunner",
    "flink.yaml": "PortableRunner",
}
ACCELERATOR_URN = "beam:resources:accelerator:v1"
GPU = "type:nvidia-l4;count:1;install-nvidia-driver"


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Building a Dataflow graph must not reach Google Cloud (nothing here may leave 127.0.0.1)."""
    real = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"test: network access to {address!r} refused")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


def test_every_runner_has_an_options_file():
    assert sorted(p.name for p in OPTIONS.glob("*.yaml")) == sorted(EXPECTED_RUNNER)


@pytest.mark.parametrize("name", sorted(EXPECTED_RUNNER))
def test_options_file_parses_into_pipeline_options(name):
    argv, kiln = load_options_file(OPTIONS / name)
    opts = PipelineOptions(argv)
    assert opts.view_as(StandardOptions).runner == EXPECTED_RUNNER[name]
    # Every flag is one Beam knows: nothing is silently discarded at submission.
    known = opts.get_all_options()
    for flag in argv:
        key = flag[2:].split("=", 1)[0]
        assert key in known, flag
    assert isinstance(kiln, dict) and kiln.get("samples_per_shard") == 10000


def test_options_files_say_what_each_runner_needs():
    direct = PipelineOptions(load_options_file(OPTIONS / "direct.yaml")[0]).view_as(DirectOptions)
    assert direct.direct_running_mode == "in_memory"
    multi = PipelineOptions(load_options_file(OPTIONS / "direct-multiprocess.yaml")[0]).view_as(DirectOptions)
    assert (multi.direct_running_mode, multi.direct_num_workers) == ("multi_processing", 2)

    argv, kiln = load_options_file(OPTIONS / "dataflow.yaml")
    df = PipelineOptions(argv)
    assert set(df.view_as(DebugOptions).experiments) >= {"use_runner_v2", "no_use_multiple_sdk_containers"}
    assert df.view_as(WorkerOptions).sdk_container_image == "us-docker.pkg.dev/your-project/kiln/worker:latest"
    assert df.view_as(WorkerOptions).machine_type
    assert df.get_all_options()["region"] == "us-central1"
    assert df.get_all_options()["temp_location"].startswith("gs://")
    # The GPU goes on the model stages only, through kiln's resource hint, never pipeline-wide.
    assert not df.get_all_options().get("resource_hints")
    assert not any("worker_accelerator" in o for o in (df.get_all_options().get("dataflow_service_options") or []))
    assert model_stage_hints(ModelsConfig(gpu_resource_hint=kiln["gpu_resource_hint"])) == {"accelerator": kiln["gpu_resource_hint"]}
    assert "install-nvidia-driver" in kiln["gpu_resource_hint"] and kiln["gpu_resource_hint"].startswith("type:")
    assert placeholders(argv)  # the shipped file must be filled in before use

    spark = PipelineOptions(load_options_file(OPTIONS / "spark.yaml")[0]).get_all_options()
    assert spark["job_endpoint"] == "localhost:8099" and spark["environment_type"] == "DOCKER"
    flink = PipelineOptions(load_options_file(OPTIONS / "flink.yaml")[0]).get_all_options()
    assert flink["job_endpoint"] == "localhost:8099" and flink["environment_type"] == "DOCKER" and flink["parallelism"] == 16


@pytest.mark.parametrize("name", ["spark.yaml", "flink.yaml"])
def test_job_server_commands_name_this_beam_version(name):
    """The job-server command in each file's header runs the Beam version kiln is installed with
    (the job server and the SDK must match) and, for Flink, a version Beam builds job servers for."""
    import re

    from apache_beam.options.pipeline_options import FlinkRunnerOptions
    from apache_beam.version import __version__ as beam_version

    text = (OPTIONS / name).read_text() + (REPO / "docs" / "running-at-scale.md").read_text()
    images = re.findall(r"docker run --net=host apache/beam_(spark3|flink[0-9.]+)_job_server:(\S+) (--\S+)", text)
    assert images, name
    for kind, tag, flag in images:
        assert tag == beam_version, (kind, tag)
        if kind.startswith("flink"):
            assert kind[len("flink"):] in FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS
            assert flag.startswith("--flink-master=")  # what Beam's own FlinkJarJobServer passes
        else:
            assert flag.startswith("--spark-master-url=spark://")
    jars = re.findall(r"beam-runners-(spark-3|flink-[0-9.]+)-job-server-(\S+)\.jar", text)
    assert jars and all(v == beam_version for _, v in jars)


@pytest.mark.parametrize("name", ["spark.yaml", "flink.yaml"])
def test_the_one_machine_check_the_files_describe_passes_beams_validation(name):
    """`--job_endpoint=embed --environment_type=LOOPBACK` on top of the file (its header's first
    check): the file's DOCKER image (environment_config) goes with its environment type, since Beam
    refuses environment_config with LOOPBACK when the pipeline is created."""
    argv, _ = load_options_file(OPTIONS / name)
    merged = merge_beam_args(argv, ["--job_endpoint=embed", "--environment_type=LOOPBACK"])
    assert not any(a.startswith(("--environment_config", "--environment_option")) for a in merged)
    opts = PipelineOptions(merged)
    beam.Pipeline(options=opts)  # runs Beam's option validation; raises ValueError on errors
    assert opts.get_all_options()["job_endpoint"] == "embed"
    # An image given on the command line with the new type stays.
    merged = merge_beam_args(argv, ["--environment_type=DOCKER", "--environment_config=registry.example/kiln:1"])
    assert [a for a in merged if a.startswith("--environment_config")] == ["--environment_config=registry.example/kiln:1"]


def test_command_line_beats_the_file():
    file_argv, _ = load_options_file(OPTIONS / "direct-multiprocess.yaml")
    merged = merge_beam_args(file_argv, ["--direct_num_workers=4"])
    assert PipelineOptions(merged).view_as(DirectOptions).direct_num_workers == 4
    assert merged.count("--direct_num_workers=2") == 0
    # "--flag value" (two tokens) too, and the runner itself.
    merged = merge_beam_args(file_argv, ["--direct_num_workers", "3", "--direct_running_mode", "in_memory"])
    d = PipelineOptions(merged).view_as(DirectOptions)
    assert (d.direct_num_workers, d.direct_running_mode) == (3, "in_memory")
    # An alias of the same option (machine_type / worker_machine_type) replaces it.
    df_argv, _ = load_options_file(OPTIONS / "dataflow.yaml")
    merged = merge_beam_args(df_argv, ["--worker_machine_type=n2-standard-4", "--project=my-real-project"])
    opts = PipelineOptions(merged)
    assert opts.view_as(WorkerOptions).machine_type == "n2-standard-4"
    assert opts.get_all_options()["project"] == "my-real-project"
    assert not any(a.startswith("--machine_type=") for a in merged)
    # Repeatable options accumulate: an extra experiment keeps the file's.
    merged = merge_beam_args(df_argv, ["--experiments=enable_data_sampling", "--experiments=use_runner_v2"])
    exps = PipelineOptions(merged).view_as(DebugOptions).experiments
    assert {"use_runner_v2", "no_use_multiple_sdk_containers", "enable_data_sampling"} <= set(exps)
    assert exps.count("use_runner_v2") == 1


def _write(tmp_path, text) -> Path:
    p = tmp_path / "opts.yaml"
    p.write_text(text)
    return p


def _resolve(argv):
    """`kiln prepare ARGV` as the CLI resolves it: (config, Beam argv)."""
    ns, beam_argv = prepare_parser().parse_known_args(argv)
    return config_from_namespace(ns, beam_argv)


def test_kiln_section_gives_defaults_and_typed_flags_win(tmp_path):
    path = _write(tmp_path, "runner: DirectRunner\ndirect_num_workers: 1\nkiln:\n  image_size: 512\n  samples_per_shard: 77\n"
                            "  clip: score\n  nsfw: 'off'\n  gpu_resource_hint: 'type:nvidia-tesla-t4;count:1'\n")
    cfg, beam_argv = _resolve(["--input", "x.parquet", "--output", "out", "--image-size", "256", "--options", str(path),
                               "--direct_num_workers=2"])
    assert cfg.image.image_size == 256  # typed on the command line
    assert cfg.output.samples_per_shard == 77 and cfg.clip.clip_mode == "score"  # from the file
    assert cfg.models.gpu_resource_hint == "type:nvidia-tesla-t4;count:1"
    assert PipelineOptions(beam_argv).view_as(DirectOptions).direct_num_workers == 2


@pytest.mark.parametrize("text, message", [
    ("runer: DirectRunner\n", "not a Beam pipeline option"),
    ("- runner\n", "YAML mapping"),
    ("direct_num_workers: [1, 2]\n", "takes one value"),
    ("flink_version: '0.1'\n", "not one of"),
    ("save_main_session: 3\n", "is a flag"),
])
def test_bad_options_files_fail_loudly(tmp_path, text, message):
    with pytest.raises(OptionsFileError, match=message):
        load_options_file(_write(tmp_path, text))


@pytest.mark.parametrize("text, message", [
    ("kiln:\n  image_sise: 3\n", "not a kiln prepare setting"),
    ("kiln:\n  clip: maybe\n", "not one of"),
    ("kiln:\n  image_size: big\n", "image_size: expected an integer"),
    ("kiln:\n  samples_per_shard: -5\n", "must be >= 1"),
    ("kiln:\n  allow_upscale: 'yes'\n", "expected true or false"),
    ("kiln:\n  output: elsewhere\n", "not a kiln prepare setting"),
])
def test_bad_kiln_settings_fail_loudly(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as err:
        _resolve(["--input", "x.parquet", "--output", "out", "--nsfw", "off", "--options", str(path)])
    assert str(path) in str(err.value)  # the message names the file


def test_placeholders_must_be_replaced_before_submitting():
    base = ["--input", "gs://b/x.parquet", "--output", "gs://b/out", "--nsfw-head", "gs://b/nsfw.safetensors",
            "--options", str(OPTIONS / "dataflow.yaml")]
    with pytest.raises(OptionsFileError, match="your-project"):
        _resolve(base)
    filled = ["--project=kiln-test", "--temp_location=gs://kiln-test-bucket/tmp", "--staging_location=gs://kiln-test-bucket/staging",
              "--sdk_container_image=us-docker.pkg.dev/kiln-test/kiln/worker:1"]
    cfg, beam_argv = _resolve(base + filled)
    assert not placeholders(beam_argv)
    assert cfg.models.gpu_resource_hint.startswith("type:nvidia-l4") and cfg.models.device == "cuda"


def _metadata(tmp_path) -> Path:
    path = tmp_path / "meta.parquet"
    pq.write_table(pa.table({
        "SAMPLE_ID": pa.array([1, 2], pa.int64()), "URL": ["https://example.com/a.jpg", "https://example.com/b.jpg"],
        "TEXT": ["a red circle", "a blue square"], "HEIGHT": pa.array([512, 512], pa.int64()),
        "WIDTH": pa.array([512, 512], pa.int64()), "LICENSE": ["?", "?"], "NSFW": ["UNLIKELY", "UNLIKELY"],
        "similarity": [0.31, 0.32],
    }), path)
    return path


def _build(tmp_path, argv, *extra, gpu=None):
    """The real job graph (pipeline.prepare.build_pipeline) with these Beam options; not run."""
    from pipeline.prepare import build_pipeline

    meta = _metadata(tmp_path)
    # Model specs are only strings here: build_pipeline loads no model (DoFn.setup does).
    cfg = prepare_config(str(meta), str(tmp_path / "out"), "", "--toxicity-model", "local:/models/toxicity",
                         "--clip-model", "local-dir:/models/clip", "--nsfw-head", "/models/nsfw/head.safetensors",
                         "--t5-model", "local:/models/t5", *extra, *(["--gpu-resource-hint", gpu] if gpu else []))
    p = beam.Pipeline(options=PipelineOptions(argv))
    build_pipeline(p, cfg, pq.read_schema(meta), frozenset(), "fp")
    return p


@pytest.mark.parametrize("name", sorted(EXPECTED_RUNNER))
def test_job_graph_builds_with_each_options_file(tmp_path, name):
    argv, _ = load_options_file(OPTIONS / name)
    # dry_run: Beam's own switch that skips the options checks needing Google Cloud (bucket policy).
    p = _build(tmp_path, [*argv, "--dry_run=True"])
    proto = p.to_runner_api()
    labels = {t.unique_name for t in proto.components.transforms.values()}
    for label in ("ReadMetadata", "Prefilter", "Download", "Decode", "Resize", "WriteShards", *MODEL_STAGE_LABELS):
        assert label in labels, label
    assert type(p.runner).__name__ in {"SwitchingDirectRunner", "DataflowRunner", "PortableRunner", "FlinkRunner"}


def test_hinted_puts_the_accelerator_on_that_transform_only():
    class Model(beam.PTransform):
        def expand(self, pcoll):
            return pcoll | "Batch" >> beam.Map(lambda x: [x]) | "Score" >> beam.Map(lambda b: b[0])

    p = beam.Pipeline(options=PipelineOptions([]))
    hints = model_stage_hints(ModelsConfig(gpu_resource_hint=GPU))
    (p | "Create" >> beam.Create([1, 2]) | "Before" >> beam.Map(lambda x: x)
       | "Model" >> hinted(Model(), hints) | "After" >> beam.Map(lambda x: x)
       | "Plain" >> hinted(beam.Map(lambda x: x), model_stage_hints(ModelsConfig())))
    leaves = transform_resource_hints(p.to_runner_api())
    hinted_leaves = {name for name, h in leaves.items() if h.get(ACCELERATOR_URN) == GPU.encode()}
    assert hinted_leaves == {"Model/Batch", "Model/Score"}
    assert not any(ACCELERATOR_URN in h for name, h in leaves.items() if not name.startswith("Model/"))
    assert model_stage_hints(ModelsConfig(gpu_resource_hint="  ")) == {}


def test_gpu_hint_lands_on_exactly_the_model_stages_of_the_real_graph(tmp_path):
    """build_pipeline wraps CaptionToxicity, ImageFilters and EmbedT5, and nothing else, in
    `hinted(..., model_stage_hints(cfg.models))`."""
    argv, kiln = load_options_file(OPTIONS / "dataflow.yaml")
    p = _build(tmp_path, load_options_file(OPTIONS / "direct.yaml")[0], gpu=kiln["gpu_resource_hint"])
    leaves = transform_resource_hints(p.to_runner_api())
    want = kiln["gpu_resource_hint"].encode()
    for stage in MODEL_STAGE_LABELS:
        under = {n: h for n, h in leaves.items() if n.startswith(f"{stage}/")}
        assert under and all(h.get(ACCELERATOR_URN) == want for h in under.values()), stage
    others = [n for n, h in leaves.items() if ACCELERATOR_URN in h and not n.startswith(tuple(f"{s}/" for s in MODEL_STAGE_LABELS))]
    assert others == []
    assert any(n.startswith("Download/") for n in leaves)
    # Without a hint nothing is hinted (the local runs' graph is unchanged).
    plain = transform_resource_hints(_build(tmp_path, [], gpu=None).to_runner_api())
    assert not any(ACCELERATOR_URN in h for h in plain.values())


# -- progress --------------------------------------------------------------------------------------


def _slow(x):
    time.sleep(0.004)
    return x


@pytest.mark.parametrize("name", ["direct.yaml", "direct-multiprocess.yaml"])
def test_progress_line_during_a_local_run(name):
    n = 600
    opts = PipelineOptions(load_options_file(OPTIONS / name)[0])
    progress = LocalProgress.for_run(opts)
    assert progress is not None
    try:
        p = beam.Pipeline(options=opts)
        rows = tap(p | beam.Create(range(n)), progress.dir, "read") | beam.Map(_slow)
        tap(rows | "Keep" >> beam.Filter(lambda x: x % 4), progress.dir, "kept")
        # Rejects come from several stages: one tap per stream, as prepare.build_pipeline does.
        tap_all([rows | "RejectA" >> beam.Filter(lambda x: x % 8 == 0), rows | "RejectB" >> beam.Filter(lambda x: x % 8 == 4)],
                progress.dir, "rejected")
        out = io.StringIO()
        with progress.printer(n, interval_s=0.2, stream=out) as printer:
            p.run().wait_until_finish()
        lines = out.getvalue().splitlines()
        assert printer.lines_printed >= 2 and len(lines) >= 2
        # Lines while the job ran, then the final counts.
        assert any(" 0.0%" not in line and "100.0%" not in line for line in lines[:-1]), lines
        assert lines[-1].startswith(f"kiln prepare: read {n:,}/{n:,} 100.0% | kept {n - n // 4:,} | rejected {n // 4:,} | done 100.0%")
        assert read_taps(progress.dir) == {"read": n, "kept": n - n // 4, "rejected": n // 4}
    finally:
        progress.close()


def test_progress_only_taps_local_runners():
    assert runs_locally(PipelineOptions([]))
    assert runs_locally(PipelineOptions(["--runner=PortableRunner", "--environment_type=LOOPBACK"]))
    for name in ("dataflow.yaml", "spark.yaml", "flink.yaml"):
        opts = PipelineOptions(load_options_file(OPTIONS / name)[0])
        assert not runs_locally(opts) and LocalProgress.for_run(opts) is None
    assert LocalProgress.for_run(PipelineOptions([]), enabled=False) is None
    p = beam.Pipeline()
    pc = p | beam.Create([1])
    assert tap(pc, None, "read") is pc


def test_progress_from_a_running_jobs_metrics():
    """Runners whose run() returns at once (Dataflow) report through their Beam counters."""

    class Counter:
        def __init__(self, name, value):
            self.key = type("K", (), {"metric": type("M", (), {"name": name})()})()
            self.committed, self.attempted = None, value

    class Result:
        def metrics(self):
            class Q:
                def query(self, _filter):
                    return {"counters": [Counter("read/rows", 100), Counter("download/rejected", 7),
                                         Counter("prefilter/rejected", 3), Counter("write/samples", 40),
                                         Counter("reject/download/http_404", 7)]}
            return Q()

    out = io.StringIO()
    printer = ProgressPrinter(Result(), 200, stream=out)
    line = printer.poll(final=True)
    assert line.startswith("kiln prepare: read 100/200  50.0% | kept 40 | rejected 10 | done 25.0%")


def test_progress_line_format():
    line = format_line({"read": 41000, "kept": 20112, "rejected": 9870}, 41000, 73.4, 412.0)
    assert line == ("kiln prepare: read 41,000/41,000 100.0% | kept 20,112 | rejected 9,870 | done 73.1% | "
                    "412 rows/s | 0:01:13 | eta 0:00:26")


def test_progress_rewrites_one_line_on_a_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    printer = ProgressPrinter("/nonexistent-kiln-progress", 10, stream=out)
    printer.poll()
    printer.poll(final=True)
    assert out.getvalue().startswith("\rkiln prepare: read 0/10") and out.getvalue().endswith("\n")
    assert out.getvalue().count("\n") == 1


def test_prepare_prints_progress_while_it_runs(tmp_path, capsys):
    """prepare.run starts a ProgressPrinter for local runs: a real, small `kiln prepare` without
    --quiet prints progress lines."""
    from pipeline.prepare import run
    from pipeline.testbed.server import SynthServer
    from pipeline.testbed.synth import synthesize

    web = synthesize(tmp_path / "web", rows=80, seed=3, failure_rate=0.3)
    with SynthServer(web) as s:
        run(prepare_config(str(web.metadata_path), str(tmp_path / "out"), s.allow_hosts, "--image-size", "64",
                           "--download-timeout", "3", "--toxicity", "off", "--clip", "off", "--nsfw", "off", "--t5", "off"), [])
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("kiln prepare: read ")]
    assert lines, err[-2000:]
    assert lines[-1].startswith("kiln prepare: read 80/80 100.0%") and "done 100.0%" in lines[-1]
