"""What CLN's plugin manager (reckless) installs: plugin/micropay/ alone, with its
requirements.txt, run through a wrapper like reckless's."""
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parents[2] / "plugin" / "micropay"


def test_requirements_txt_matches_the_project_dependencies():
    project = tomllib.loads((PLUGIN_DIR.parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    listed = [line.strip() for line in (PLUGIN_DIR / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert listed == project


def test_the_plugin_runs_from_a_copy_of_its_directory(tmp_path):
    """reckless copies plugin/micropay/ to <dir>/source/micropay and runs
    runpy.run_module("micropay") with that directory on sys.path."""
    staged = tmp_path / "source" / "micropay"
    shutil.copytree(PLUGIN_DIR, staged, ignore=shutil.ignore_patterns("__pycache__"))
    wrapper = tmp_path / "micropay.py"
    wrapper.write_text(f"import runpy, sys\nsys.path.append({str(staged)!r})\n"
                       f"if {str(tmp_path)!r} in sys.path: sys.path.remove({str(tmp_path)!r})\n"
                       "runpy.run_module('micropay', {}, '__main__')\n")
    import site
    # The dependencies, as reckless's own virtualenv has them, but not an installed micropay
    # (an editable install's .pth file, or a copy in site-packages when installed with
    # `pip install .`): a directory of links to everything else, and -S so no .pth is read.
    deps = tmp_path / "deps"
    deps.mkdir()
    for sp in map(Path, site.getsitepackages()):
        for entry in sp.iterdir() if sp.is_dir() else ():
            lowered = entry.name.lower()
            if lowered.startswith(("micropay", "cln_micropay", "__editable__", "_cln_micropay")) \
                    or entry.suffix == ".pth" or (deps / entry.name).exists():
                continue
            (deps / entry.name).symlink_to(entry)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(deps)}
    res = subprocess.run([sys.executable, "-S", str(wrapper)], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env=env)       # not under lightningd: pyln prints the plugin's usage
    assert res.returncode == 0, res.stderr
    assert str(staged) in res.stdout or "micropay" in res.stdout
    assert "micropay-invoice" in res.stdout and "streampay-start" in res.stdout


def test_one_coincurve_owns_the_coincurve_directory_and_it_works():
    """pyln-proto pulls in coincurve-cp314-fix, which installs the same `coincurve`
    package directory as coincurve, which micropay declares: pip installs both, the one
    installed last overwriting the other's files. Whatever the order, every file on disk
    must come whole from one of them (no mix of two builds), and it must do what the
    receipts need: a known key, signature and verification."""
    import base64
    import hashlib
    import importlib.metadata as md

    import coincurve
    root = Path(coincurve.__file__).parent
    owners = []
    for name in ("coincurve", "coincurve-cp314-fix"):
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        recorded = {str(f): f.hash.value for f in dist.files or ()
                    if str(f).startswith("coincurve/") and f.hash and not str(f).endswith(".pyc")}
        on_disk = {}
        for rel in recorded:
            p = root.parent / rel
            if p.exists():
                on_disk[rel] = base64.urlsafe_b64encode(hashlib.sha256(p.read_bytes()).digest()).rstrip(b"=").decode()
        if recorded and all(on_disk.get(rel) == h for rel, h in recorded.items()):
            owners.append(f"{name} {dist.version}")
    assert len(owners) >= 1, "the coincurve directory mixes files of several distributions"
    from micropay.core.receipts import ReceiptSigner, verify_receipt
    signer = ReceiptSigner(coincurve.PrivateKey(bytes.fromhex("11" * 32)))
    assert signer.pubkey_hex == "034f355bdcb7cc0af728ef3cceb9615d90684bb5b2ca5f859ab0f0b704075871aa"
    receipt = signer.sign({"v": 1, "n": 1})
    assert verify_receipt(receipt, signer.pubkey_hex)["n"] == 1
    print("coincurve on disk comes whole from:", ", ".join(owners))
