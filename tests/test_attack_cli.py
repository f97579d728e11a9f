"""The dataset commands under attack: bad options and inputs exit 2 naming the problem before any model loads,
`--resume` refuses to mix runs, a second writer, the input as output and files it cannot stream, `| head` ends
quietly, and `label` gets a `--resume` as safe as score's."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tracemalloc

import pytest

from rlhf_rewards.cli import main

pytest.importorskip("datasets")

SCALAR, PAIRWISE = "ray2333-mistral-7b", "pairrm"
OTHER_SCALAR = "sequence-classifier"


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def rows(n: int) -> list[dict]:
    return [{"id": f"r{i}", "prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(n)]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr("rlhf_rewards.loading.load_reward_model", refuse)


def exits_2(capsys, argv, *needles) -> str:
    """Run the command; it must exit 2 (argparse's or the command's own usage error) with each needle on stderr."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


# -- options checked as they are parsed ------------------------------------------------------------------------------
@pytest.mark.parametrize("option, needles", [
    (["--max-length", "0"], ["--max-length", "positive integer, got 0"]),
    (["--max-batch-tokens", "-1"], ["--max-batch-tokens", "positive integer, got -1"]),
    (["--dtype", "int8"], ["--dtype", "unknown dtype 'int8'", "bfloat16"]),
    (["--device", "cuda:7"], ["--device", "'cuda:7' is not a device of this machine", "devices here are: cpu"]),
    (["--chunk-size", "0"], ["--chunk-size", "positive integer, got 0"]),
    (["--reward-column", ""], ["--reward-column", "must name a field"]),
])
def test_bad_option_values_exit_2_before_the_model_loads(tmp_path, tiny_dir, no_model, capsys, option, needles):
    data = write_jsonl(tmp_path / "in.jsonl", rows(2))
    exits_2(capsys, ["score", data, "--model", tiny_dir(SCALAR), *option], *needles)


def test_device_check_lists_the_cuda_devices_there_are(monkeypatch, tmp_path, tiny_dir, no_model, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    data = write_jsonl(tmp_path / "in.jsonl", rows(2))
    exits_2(capsys, ["score", data, "--model", tiny_dir(SCALAR), "--device", "cuda:7"],
            "'cuda:7' is not a device of this machine; the devices here are: cpu, cuda:0, cuda:1")


# -- inputs that cannot be read: the file and line named -------------------------------------------------------------
@pytest.mark.parametrize("name, content, needles", [
    ("empty.jsonl", "", ["empty.jsonl: is empty (no rows)"]),
    ("blank.jsonl", "\n   \n\n", ["blank.jsonl: has no rows (only blank lines)"]),
    ("empty.csv", "", ["empty.csv: is empty"]),
    ("header.csv", "id,prompt,completion\n", ["header.csv: has no rows"]),
    ("fields.csv", "id,prompt,completion\n1,a,b\n2,a,b,c,d\n3,a,b\n", ["fields.csv:3: 5 fields where the header"]),
    ("quote.csv", 'id,prompt,completion\n1,a,b\n2,a,"b\n3,a,b\n', ["quote.csv:3:"]),
    ("array.json", '[{"id": 1, "prompt": "a", "completion": "b"},\n {"id": 2, "prompt": "a" "completion": "b"}]\n',
     ["array.json:2: malformed JSON"]),
    ("empty_array.json", "[]", ["empty_array.json: has no rows"]),
    ("lines.json", '{"id": 1, "prompt": "a", "completion": "b"}\n{"id": 2, "prompt": }\n',
     ["lines.json:2: malformed JSON"]),
    ("ids.jsonl", '{"id": 1, "prompt": "a", "completion": "b"}\n{"id": "1", "prompt": "a", "completion": "c"}\n',
     ["column 'id' holds a string \"1\" at line 2 and a number 1 at line 1", "same type"]),
])
def test_unreadable_input_names_file_and_line(tmp_path, tiny_dir, no_model, capsys, name, content, needles):
    (tmp_path / name).write_text(content)
    err = exits_2(capsys, ["score", str(tmp_path / name), "--model", tiny_dir(SCALAR), "--id-column", "id"],
                  *needles)
    assert "share 'id'" not in err  # 1 and "1" are different ids, not duplicates


def test_input_with_the_error_field_already_is_refused(tmp_path, tiny_dir, no_model, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", [{**r, "reward_error": "x"} for r in rows(2)])
    exits_2(capsys, ["score", data, "--model", tiny_dir(SCALAR)], "already has a column 'reward_error'")


# -- outputs ---------------------------------------------------------------------------------------------------------
def test_output_that_is_the_input_is_refused(tmp_path, tiny_dir, no_model, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", rows(3))
    before = (tmp_path / "in.jsonl").read_bytes()
    os.symlink(data, tmp_path / "link.jsonl")
    os.link(data, tmp_path / "hard.jsonl")
    for output in (data, str(tmp_path / "link.jsonl"), str(tmp_path / "hard.jsonl")):
        for resume in ([], ["--resume"]):
            exits_2(capsys, ["score", data, "--model", tiny_dir(SCALAR), "--output", output, *resume],
                    f"--output {output} is the input file {data}")
        exits_2(capsys, ["label", data, "--model", tiny_dir(SCALAR), "--skipped-output", output],
                "is the input file")
    assert (tmp_path / "in.jsonl").read_bytes() == before


def test_output_and_skipped_output_the_same_file_is_refused(tmp_path, tiny_dir, no_model, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a", "responses": ["x", "y"]}])
    same = tmp_path / "same.jsonl"
    exits_2(capsys, ["label", data, "--model", tiny_dir(SCALAR), "--output", str(same), "--skipped-output",
                     str(same)], "--output and --skipped-output name the same file")
    assert not same.exists()


def test_resume_refuses_a_file_it_cannot_stream(tmp_path, tiny_dir, no_model, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", rows(2))
    exits_2(capsys, ["score", data, "--model", tiny_dir(SCALAR), "--output", "/dev/full", "--resume"],
            "/dev/full: not a regular file")
    os.symlink(tmp_path / "nowhere.jsonl", tmp_path / "dangling.jsonl")
    exits_2(capsys, ["score", data, "--model", tiny_dir(SCALAR), "--output", str(tmp_path / "dangling.jsonl")],
            "already exists")


def test_a_failed_fresh_run_leaves_no_output_behind(tmp_path, tiny_dir, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr("rlhf_rewards.loading.load_reward_model", broken)
    data = write_jsonl(tmp_path / "in.jsonl", rows(2))
    out = tmp_path / "out.jsonl"
    with pytest.raises(OSError, match="disk on fire"):
        main(["score", data, "--model", tiny_dir(SCALAR), "--output", str(out)])
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]  # no empty output, no sidecar: the same command runs again


@pytest.fixture
def scored(tmp_path, tiny_dir):
    """An input of 6 rows, and a complete output of it with its sidecar."""
    data = write_jsonl(tmp_path / "in.jsonl", rows(6))
    out = tmp_path / "out.jsonl"
    assert main(["score", data, "--model", tiny_dir(SCALAR), "--id-column", "id", "--output", str(out)]) == 0
    return data, out


def test_resume_with_other_model_options_or_input_is_refused(scored, tmp_path, tiny_dir, no_model, capsys):
    data, out = scored
    before = out.read_bytes()
    base = ["score", data, "--id-column", "id", "--output", str(out), "--resume"]
    exits_2(capsys, [*base, "--model", tiny_dir(OTHER_SCALAR), "--preset", OTHER_SCALAR], "--resume:",
            f"was written with --model \"{os.path.realpath(tiny_dir(SCALAR))}\" (this run: "
            f"\"{os.path.realpath(tiny_dir(OTHER_SCALAR))}\")", f"--preset \"{SCALAR}\" (this run: \"{OTHER_SCALAR}\")")
    exits_2(capsys, [*base, "--model", tiny_dir(SCALAR), "--reward-column", "score", "--dtype", "bf16"],
            "--reward-column \"reward\" (this run: \"score\")", "--dtype \"float32\" (this run: \"bfloat16\")")
    exits_2(capsys, [*base, "--model", tiny_dir(SCALAR), "--max-length", "64"],
            "--max-length (none) (this run: 64)")
    with open(data, "a") as f:
        f.write(json.dumps({"id": "new", "prompt": "Another?", "completion": "Yes."}) + "\n")
    exits_2(capsys, [*base, "--model", tiny_dir(SCALAR)], "input {")
    os.remove(str(out) + ".meta.json")
    exits_2(capsys, [*base, "--model", tiny_dir(SCALAR)], "has no record of what wrote it")
    assert out.read_bytes() == before


def test_a_second_writer_is_refused(scored, tiny_dir, no_model, capsys):
    data, out = scored
    before = out.read_bytes()
    with open(out, "a") as holder:  # another run writing this output holds its lock
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        exits_2(capsys, ["score", data, "--model", tiny_dir(SCALAR), "--id-column", "id", "--output", str(out),
                         "--resume"], "another process is writing it")
    assert out.read_bytes() == before


def test_resume_refuses_duplicate_ids_in_the_output(scored, tiny_dir, no_model, capsys):
    data, out = scored
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:3] + lines[1:2]))  # as two runs appending at once left it
    exits_2(capsys, ["score", data, "--model", tiny_dir(SCALAR), "--id-column", "id", "--output", str(out),
                     "--resume"], f"{out}:4: repeats the 'id' 'r1' of line 2")


def test_resume_streams_the_output(tmp_path, tiny_dir, no_model, capsys):
    n = 3000
    data = write_jsonl(tmp_path / "in.jsonl", rows(n))
    out = tmp_path / "out.jsonl"
    pad = "x" * 16000  # a done output of 48 MB: resuming it must not hold it in memory
    write_jsonl(out, [{**r, "reward": 0.5, "pad": pad} for r in rows(n)])
    from rlhf_rewards.cli.outputs import describe_run, write_record
    from rlhf_rewards.presets import resolve_preset
    from rlhf_rewards.cli import build_parser

    args = build_parser().parse_args(["score", data, "--model", tiny_dir(SCALAR)])
    write_record(str(out), describe_run("score", args, resolve_preset(tiny_dir(SCALAR), None), data, **{
        "--prompt-column": "prompt", "--completion-column": "completion", "--baseline-column": None,
        "--transform": "logodds", "--reward-column": "reward"}))
    tracemalloc.start()
    try:
        assert main(["score", data, "--model", tiny_dir(SCALAR), "--id-column", "id", "--output", str(out),
                     "--resume"]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"rows: {n} ({n} already in the output, 0 scored now)" in capsys.readouterr().err
    assert peak < 16 * 2**20, f"resuming a 48 MB output peaked at {peak / 2**20:.0f} MB of Python memory"


# -- label --resume ----------------------------------------------------------------------------------------------------
def candidates(n: int) -> list[dict]:
    return [{"id": i, "prompt": f"Question {i}?", "responses": [f"A{i}", f"B{i}", f"C{i % 3}"]} for i in range(n)]


def test_label_resumes_an_interrupted_run_to_the_uninterrupted_result(tmp_path, tiny_dir, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "c.jsonl", candidates(12))
    data_rows = read_jsonl(data)
    data_rows[5]["responses"] = ["only one", "only one"]  # a row without a pair, in the skipped file
    write_jsonl(data, data_rows)
    model = ["--model", tiny_dir(SCALAR), "--id-column", "id", "--chunk-size", "3"]
    whole, whole_skipped = tmp_path / "whole.jsonl", tmp_path / "whole_skipped.jsonl"
    assert main(["label", data, *model, "--output", str(whole), "--skipped-output", str(whole_skipped)]) == 0

    from rlhf_rewards.cli import label

    real, calls = label.label_chunk, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(label, "label_chunk", interrupted)
    out, skipped = tmp_path / "dpo.jsonl", tmp_path / "skipped.jsonl"
    argv = ["label", data, *model, "--output", str(out), "--skipped-output", str(skipped)]
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    monkeypatch.setattr(label, "label_chunk", real)
    with open(out, "a") as f:  # a chunk in flight when the run was killed: lines after the last checkpoint
        f.write('{"id": 6, "prompt": "Question 6?", "chosen": "A6"}\n{"id": 7, "pro')
    capsys.readouterr()
    exits_2(capsys, argv, "already exists", "--resume")
    exits_2(capsys, [*argv, "--resume", "--max-length", "64"], "--max-length (none) (this run: 64)")
    assert main([*argv, "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"{out}:6: dropped 2 line(s)" in err and "the last one torn" in err
    assert "rows: 12 (6 labelled by an earlier run)" in err and "dropped (rows labelled again): 2" in err
    assert "1 x fewer than two distinct candidates" in err
    assert out.read_bytes() == whole.read_bytes()
    assert skipped.read_bytes() == whole_skipped.read_bytes()


def test_label_reports_an_empty_candidate(tmp_path, tiny_dir, capsys):
    data = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Hi", "responses": ["Hello.", "", "Hey."]},
                                              {"prompt": "Yo", "responses": ["Yo.", "  \n", "Hey."]},
                                              {"prompt": "Ok", "responses": ["Fine.", "Good."]}])
    out, skipped = tmp_path / "dpo.jsonl", tmp_path / "skipped.jsonl"
    assert main(["label", data, "--model", tiny_dir(SCALAR), "--output", str(out), "--skipped-output",
                 str(skipped)]) == 0
    assert [p["prompt"] for p in read_jsonl(out)] == ["Ok"]
    assert read_jsonl(skipped) == [
        {"row": 0, "reason": "empty candidate", "detail": "empty candidate: candidate 1 is empty"},
        {"row": 1, "reason": "empty candidate", "detail": "empty candidate: candidate 1 is only whitespace"}]
    assert "2 x empty candidate" in capsys.readouterr().err


# -- help, pipes, plots ----------------------------------------------------------------------------------------------
def test_help_mentions_resume_only_where_it_exists(capsys):
    for command, has_resume in (("score", True), ("label", True), ("eval", False), ("format", False)):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert ("resume" in capsys.readouterr().out) == has_resume, command


def test_output_to_a_closed_pipe_ends_quietly(tiny_dir):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone, as `| head` goes after its lines
    try:
        done = subprocess.run([sys.executable, "-m", "rlhf_rewards", "format", "--model", tiny_dir(SCALAR),
                               "--prompt", "Hi", "--completion", "Hello", "--json"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=180,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr  # 128 + SIGPIPE, what a shell reports for `yes | head`
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr and "Exception ignored" not in done.stderr


def test_subsets_plot_shows_zero_bars_names_the_chance_line_and_groups_sections(tmp_path, tiny_dir, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    data = write_jsonl(tmp_path / "p.jsonl", [
        {"subset": "alpacaeval-easy", "prompt": "Hi", "chosen": "Hello.", "rejected": "Hello."},  # a tie: 0%
        {"subset": "math-prm", "prompt": "1+1?", "chosen": "2", "rejected": "3"},
        {"subset": "my-own", "prompt": "Hi", "chosen": "Yo.", "rejected": "Yo."}])
    assert main(["eval", data, "--model", tiny_dir(SCALAR), "--output-dir", str(tmp_path / "out")]) == 0
    monkeypatch.undo()
    fig = figures[-1]  # subsets.png, the last plot drawn
    try:
        ax = fig.axes[0]
        texts = [t.get_text() for t in ax.texts]
        assert texts.count("0% of 1") >= 2  # the 0% bars carry their value, so they are seen
        assert [t.get_text() for t in ax.get_yticklabels()] == ["Chat", "alpacaeval-easy", "Reasoning", "math-prm",
                                                                "Other subsets", "my-own"]
        assert "50%: chance" in " ".join(t.get_text() for t in ax.get_legend().get_texts())
        assert ax.get_title().startswith("Preference accuracy per subset")
        fig.canvas.draw()
        legend, axes_box = ax.get_legend().get_window_extent(), ax.get_window_extent()
        assert legend.y0 >= axes_box.y1 - 1  # above the bars, not over them
    finally:
        for f in figures:
            plt.close(f)
