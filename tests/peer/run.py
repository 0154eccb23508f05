"""Run diffusers' own test files twice, without and with instantstyle's processors
swapped in (``diffusers_swap``), and list every test whose outcome differs.

    python tests/peer/run.py /path/to/diffusers [--family unet|wan [--wan-image-branch]] [--out results.json] [test files...]

``/path/to/diffusers`` is a checkout of the diffusers repository (its ``tests/``); the
installed diffusers is the one under test.  Needs ``parameterized`` and
``requests-mock`` (diffusers' test dependencies).  "Drop-in" means: no test that
passes without the swap fails with it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

FILES = [
    "tests/models/unets/test_models_unet_2d_condition.py",
    "tests/pipelines/stable_diffusion/test_stable_diffusion.py",
    "tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py",
    "tests/pipelines/controlnet/test_controlnet.py",
    "tests/pipelines/controlnet/test_controlnet_sdxl.py",
    "tests/pipelines/pag/test_pag_sd.py",
    "tests/pipelines/pag/test_pag_sdxl.py",
    "tests/pipelines/animatediff/test_animatediff.py",
]
#: ``--family wan``: Wan 2.1 I2V/FLF2V, SkyReels-V2 I2V and ChronoEdit (image-branch layers
#: fused), and their transformers' model tests (T2V-shaped: our classes delegate there)
WAN_FILES = [
    "tests/models/transformers/test_models_transformer_wan.py",
    "tests/models/transformers/test_models_transformer_skyreels_v2.py",
    "tests/models/transformers/test_models_transformer_chronoedit.py",
    "tests/pipelines/wan/test_wan_image_to_video.py",
    "tests/pipelines/skyreels_v2/test_skyreels_v2_image_to_video.py",
    "tests/pipelines/skyreels_v2/test_skyreels_v2_df_image_to_video.py",
    "tests/pipelines/chronoedit/test_chronoedit.py",
]
FAMILIES = {"unet": FILES, "wan": WAN_FILES}
HERE = os.path.dirname(os.path.abspath(__file__))


def outcomes(repo: str, path: str, swap: bool) -> tuple:
    env = dict(os.environ, PYTHONPATH=HERE, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", INSTANTSTYLE_SWAP="1" if swap else "0")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "diffusers_swap", path, "-q", "-rA", "-p", "no:cacheprovider"],
                          check=False, cwd=repo, env=env, capture_output=True, text=True)
    results = {name: status for status, name in re.findall(r"^(PASSED|FAILED|ERROR|XFAIL|XPASS) (\S+)", proc.stdout, re.MULTILINE)}
    swapped = re.search(r"instantstyle swap: (.*)", proc.stdout)
    return results, time.perf_counter() - start, swapped.group(1) if swapped else None, proc.stdout.strip().splitlines()[-1:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo", help="a diffusers checkout (its tests/ are run)")
    parser.add_argument("files", nargs="*", help="test files relative to the checkout (default: the --family list)")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="unet",
                        help="which list of files runs when none is given (default: unet)")
    parser.add_argument("--out", help="write the comparison as JSON here")
    parser.add_argument("--wan-image-branch", action="store_true",
                        help="in both runs, give Wan-family models built with image_dim the image branch "
                             "(added_kv_proj_dim) that the released I2V configs have and diffusers' tests leave out")
    args = parser.parse_intermixed_args()  # the documented order: repo [--out F] [files...]
    if args.wan_image_branch:
        os.environ["INSTANTSTYLE_WAN_IMAGE_BRANCH"] = "1"
    report, regressions = [], 0
    for path in args.files or FAMILIES[args.family]:
        base, t_base, _, tail_base = outcomes(args.repo, path, swap=False)
        ours, t_ours, swapped, tail_ours = outcomes(args.repo, path, swap=True)
        worse = sorted(n for n, s in base.items() if s == "PASSED" and ours.get(n) != "PASSED")
        better = sorted(n for n, s in ours.items() if s == "PASSED" and base.get(n) != "PASSED")
        regressions += len(worse)
        row = {"file": path, "baseline": tail_base, "swapped": tail_ours, "swap": swapped, "regressions": worse,
               "fixed": better, "seconds": [round(t_base), round(t_ours)]}
        report.append(row)
        print(f"{path}\n  baseline: {tail_base}\n  swapped:  {tail_ours}  {swapped}\n  regressions: {worse or 'none'}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
