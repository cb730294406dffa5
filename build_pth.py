"""setuptools' build_py, plus _lmoe_peft_hook.pth at the wheel's root, which pip puts into
site-packages: its one line registers lmoe with PEFT when a program imports peft
(_lmoe_peft_hook.py). In an editable install (pip install -e .) setuptools builds no package files;
the line goes straight into the editable wheel."""

from pathlib import Path

from setuptools.command.build_py import build_py

PTH = "_lmoe_peft_hook.pth"
LINE = "import _lmoe_peft_hook; _lmoe_peft_hook.install()\n"


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        # editable: setuptools zips install_lib (the unpacked editable wheel) and ignores build_lib
        root = (
            self.get_finalized_command("install").install_lib
            if self.editable_mode
            else self.build_lib
        )
        Path(root, PTH).write_text(LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, PTH))]
