"""Build step that pyproject.toml cannot declare: ship ``transformers_qwen35_autoload.pth`` into site-packages.

The ``.pth`` file is what activates the package in every process that uses transformers (see
``src/transformers_qwen35_autoload.py``). A wheel's root lands in site-packages, so ``build_py`` copies the file
into the build root; for ``pip install -e .`` setuptools builds an "editable" wheel from the folder its ``install``
command points at, so the file is copied there instead. Everything else is declared in pyproject.toml.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "transformers_qwen35_autoload.pth"
HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithActivation(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            target = self.get_finalized_command("install").install_lib
        else:
            target = self.build_lib
        self.copy_file(os.path.join(HERE, "src", PTH), os.path.join(target, PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if not getattr(self, "editable_mode", False):
            outputs.append(os.path.join(self.build_lib, PTH))
        return outputs


setup(cmdclass={"build_py": BuildPyWithActivation})
