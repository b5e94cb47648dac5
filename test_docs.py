"""The README and docs/ as a user reads them: every code block runs as written, every command parses, every
flag has help."""
import ast
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import bench
import cli
import data
import eval as evaluation
import report
import stability
from conftest import HERE, readme_block
from losses import TERMS
from model import ResNet

slow = pytest.mark.slow  # whole runs and subprocesses
# outside the method's checklist, every test here: `pytest -m "not slow"` (the checklist) leaves the file out
pytestmark = slow


@slow
def test_readme_own_training_loop_runs_as_written(capsys):
    """The block's step on a torchvision MobileNetV3, then on a timm ViT: every term finite, every parameter
    stepped, and the deployed network is timm's own VisionTransformer."""
    import timm

    namespace = {}
    exec(readme_block("### MixSKD in your own training loop"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(" {")[0] for line in printed] == ["torchvision MobileNetV3", "timm ViT"]
    for line in printed:
        terms = ast.literal_eval(line[line.index("{"):])
        assert set(terms) == set(TERMS) and all(np.isfinite(v) for v in terms.values())
    assert isinstance(namespace["deployed"], timm.models.VisionTransformer)
    assert len(namespace["opt"].state) == len(namespace["params"])  # every parameter took a step


@slow
def test_readme_own_training_loop_runs_outside_the_repository_with_the_five_files_it_names(tmp_path):
    for name in ("layouts.py", "losses.py", "mixup.py", "model.py", "self_teacher.py"):
        shutil.copy(HERE / name, tmp_path / name)
    (tmp_path / "step.py").write_text(readme_block("### MixSKD in your own training loop"))
    done = subprocess.run([sys.executable, "step.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr
    assert [line.split(" {")[0] for line in done.stdout.splitlines()] == ["torchvision MobileNetV3", "timm ViT"]


@slow
def test_readme_transfer_to_detection_and_segmentation_runs_as_written(tmp_path, monkeypatch):
    """The README block on the backbone of an ImageNet ResNet-50 (random weights, deploy.pt as train.py
    writes it); then one forward of the detector and of the segmenter on a small image."""
    net = ResNet("resnet50", 1000, 64, stem="imagenet")
    torch.save({"meta": {"arch": "resnet50", "stem": "imagenet"}, "backbone": net.state_dict()}, tmp_path / "deploy.pt")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(readme_block("## Transfer to detection and segmentation"), namespace)
    assert set(namespace["backbone"]) - set(namespace["trunk"]) == {"fc.weight", "fc.bias"}
    detector, segmenter = namespace["detector"].eval(), namespace["segmenter"].eval()
    assert torch.equal(detector.backbone.body.layer4[2].conv3.weight, net.layer4[2].conv3.weight)
    assert torch.equal(detector.backbone.body.layer1[0].bn1.running_var, net.layer1[0].bn1.running_var)
    assert type(detector.backbone.body.bn1).__name__ == "FrozenBatchNorm2d"  # as torchvision's pretrained ones
    trains = {n.split(".")[0] for n, p in detector.backbone.body.named_parameters() if p.requires_grad}
    assert trains == {"layer2", "layer3", "layer4"}
    assert torch.equal(segmenter.backbone.layer3[5].conv2.weight, net.layer3[5].conv2.weight)
    detector.transform.min_size, detector.transform.max_size = (64,), 64  # one small image, not 800 px
    with torch.no_grad():
        detections = detector([torch.rand(3, 64, 64)])
        masks = segmenter(torch.rand(1, 3, 64, 64))["out"]
    assert set(detections[0]) == {"boxes", "labels", "scores"} and masks.shape == (1, 21, 64, 64)


def test_readme_first_try_is_one_valid_command_of_train_eval_and_plot():
    train_cmd, eval_cmd, plot_cmd = (shlex.split(c) for c in readme_block("### A first try", "bash").split("&&"))
    assert train_cmd[:2] == eval_cmd[:2][:1] + ["train.py"] and train_cmd[0] == "python"
    args = cli.parse_args(train_cmd[2:])
    assert (args.method, args.epochs, args.out, args.dataset) == ("mixskd", 2, "runs/first-try", "cifar10")
    assert evaluation.parse_args(eval_cmd[2:]).checkpoint == "runs/first-try/deploy.pt"
    assert evaluation.parse_args(plot_cmd[2:]).plot == ["runs/first-try"]


DOCUMENTS = [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]
TOOLS = {"train.py": cli.parse_args, "eval.py": evaluation.parse_args, "bench.py": bench.parse_args,
         "stability.py": stability.parse_args}


def tool_commands(block):
    """Every call of a tool of TOOLS in a bash block, as (tool, argv): continued lines joined, a loop's variable
    as its first value, comments dropped; a call whose arguments still hold a shell variable is left out."""
    text = block.replace("\\\n", " ")
    first = {var: value for var, value in re.findall(r"for (\w+) in \"?([^\s;\"]+)", text)}
    for var, value in first.items():
        text = re.sub(rf"\$\{{?{var}\}}?", value, text)
    for line in text.splitlines():
        lexer = shlex.shlex(line.split("  #")[0], posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        words = list(lexer)
        for start, end in zip([0] + [i + 1 for i, w in enumerate(words) if w in (";", "&&", "|", "&")],
                              [i for i, w in enumerate(words) if w in (";", "&&", "|", "&")] + [len(words)]):
            part = words[start:end]
            tool = next((i for i, w in enumerate(part) if os.path.basename(w) in TOOLS), None)
            if tool is not None and not any("$" in w for w in part[tool:]):
                yield os.path.basename(part[tool]), part[tool + 1:]


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_every_command_in_the_readme_and_docs_parses(path, tmp_path, monkeypatch):
    """train.py, eval.py and bench.py accept every command the page shows (folders it names exist here)."""
    monkeypatch.chdir(tmp_path)
    calls = [c for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S) for c in tool_commands(block)]
    assert calls or path.name not in ("README.md", "usage.md", "results.md")
    for tool, argv in calls:
        if tool == "train.py" and "--dataset" in argv:
            dataset = argv[argv.index("--dataset") + 1]
            if not dataset.endswith(".npz") and dataset not in data.DATASETS:  # an image folder of one's own
                os.makedirs(f"{dataset}/train/cat", exist_ok=True)
                from PIL import Image

                Image.new("RGB", (32, 32)).save(f"{dataset}/train/cat/0.png")
        TOOLS[tool](argv)


@pytest.mark.parametrize("path", DOCUMENTS[1:], ids=lambda p: p.name)
def test_python_blocks_in_docs_run_as_written(path):
    for block in re.findall(r"```python\n(.*?)```", path.read_text(), re.S):
        exec(block, {})


def test_help_shows_each_default_once_and_every_flag_has_help():
    for parser in (cli.parser, bench.parser()):
        text = " ".join(parser.format_help().split())
        assert "(default: None)" not in text and "(default: False)" not in text
        assert all(action.help for action in parser._actions)
    assert "(default: cuda when available) --amp" in " ".join(cli.parser.format_help().split())
    assert "augmentation, mixing (default: 0)" in " ".join(cli.parser.format_help().split())  # 0 is not None


def test_readme_evaluates_the_run_its_first_try_writes():
    """The commands of "Evaluate, predict, deploy" name the folder the first try trains into."""
    out = cli.parse_args(shlex.split(readme_block("### A first try", "bash").split("&&")[0])[2:]).out
    calls = [argv for tool, argv in tool_commands(readme_block("### Evaluate, predict, deploy", "bash"))]
    named = [evaluation.parse_args(argv).checkpoint for argv in calls if not argv[0].startswith(("released", "--"))]
    assert named and all(path.startswith(f"{out}/") for path in named)




def test_the_tables_in_docs_are_what_their_runs_summaries_give():
    """docs/ keeps the summary.json of every run behind a table it shows (docs/summaries/): each `python eval.py
    --table docs/summaries/...` block is followed by the table that command prints, so no number drifts from its run."""
    text = (HERE / "docs" / "results.md").read_text()
    found = re.findall(r"```bash\npython eval.py --table (docs/summaries/\S+)\n```\n\n((?:\|.*\n)+)", text)
    assert found
    for path, table in found:
        assert report.results_table([str(HERE / path)]) == table.rstrip("\n"), path
