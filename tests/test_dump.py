"""Graph dumps: files in dump_dir, and the same graphs through torch's logging."""

from __future__ import annotations

import json

import torch
from moe_models import tiny_model

import lynx_compile


def compile_once(**options):
    model = tiny_model("qwen3_moe")
    compiled = torch.compile(model.forward, backend="lynx", options={"compiler": "eager", **options})
    with torch.no_grad():
        compiled(input_ids=torch.randint(2, 90, (4, 1)), use_cache=False)


def code_lines(code: str) -> str:
    """The graph's statements, without the source-line comments print_readable adds."""
    return "\n".join(line for line in code.splitlines() if not line.strip().startswith("#"))


def test_dump_files_written_and_readable(tmp_path):
    compile_once(dump_dir=str(tmp_path))
    [run] = tmp_path.iterdir()  # this process's own folder
    [before] = run.glob("*.before.py")
    stem = before.name.removesuffix(".before.py")
    after = run / f"{stem}.after.py"
    before_code, after_code = before.read_text(), after.read_text()
    compile(before_code, str(before), "exec")  # readable Python
    compile(after_code, str(after), "exec")
    before_ops, after_ops = code_lines(before_code), code_lines(after_code)
    assert "torch.topk(" in before_ops and "lynx" not in before_ops
    assert after_ops.count("torch.ops.lynx.select_experts.default(") == 2
    assert after_ops.count("torch.ops.lynx.grouped_experts.default(") == 2
    assert "torch.topk(" not in after_ops and "grouped_mm" not in after_ops
    report = json.loads((run / f"{stem}.report.json").read_text())
    assert [m["module"] for m in report["matched"]] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert report == lynx_compile.last_report().to_dict()
    markdown = (run / f"{stem}.report.md").read_text()
    assert "| model.layers.1.mlp | Qwen3MoeSparseMoeBlock | 16 | 4 |" in markdown


def test_dump_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LYNX_DUMP_DIR", str(tmp_path / "env"))
    compile_once()
    assert len(list((tmp_path / "env").glob("*/*.after.py"))) == 1


def test_unwritable_dump_dir_warns_and_compiles(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with caplog.at_level("WARNING", logger="lynx_compile"):
        compile_once(dump_dir=str(blocker))  # used to fail the whole compile
    assert "cannot write graph dumps" in caplog.text
    assert len(lynx_compile.last_report().matched) == 2


def test_empty_dump_dir_means_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    compile_once(dump_dir="")
    assert list(tmp_path.iterdir()) == []
    assert lynx_compile.LynxOptions.from_user({"dump_dir": ""}).dump_dir is None


def test_graphs_go_to_torch_graph_code_log(caplog):
    torch._logging.set_logs(graph_code=True)
    try:
        with caplog.at_level("DEBUG"):
            compile_once()
    finally:
        torch._logging.set_logs()
    assert "lynx before rewrite" in caplog.text and "lynx after rewrite" in caplog.text
    assert "torch.ops.lynx.select_experts.default" in caplog.text


def test_report_prints_as_table():
    compile_once(policy="off")
    text = str(lynx_compile.last_report())
    assert "## Rewritten MoE layers (2)" in text
    assert "| model.layers.0.mlp | Qwen3MoeSparseMoeBlock |" in text
