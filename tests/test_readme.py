"""README.md and CI must agree: the commands README gives for the tests are the ones CI runs."""

from __future__ import annotations

import re
import unittest

from tests.support import ROOT


def _readme_test_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^## Run the tests\n(.*?)(?=^## )", readme, re.M | re.S)
    assert section, "README.md has no '## Run the tests' section"
    block = re.search(r"```sh\n(.*?)```", section.group(1), re.S)
    assert block, "the 'Run the tests' section has no ```sh block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def _ci_commands() -> list[str]:
    script = (ROOT / ".ci" / "run").read_text()
    return [line.strip() for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]


class ReadmeMatchesCI(unittest.TestCase):
    def test_readme_gives_make_lint_and_make_test(self) -> None:
        self.assertEqual(_readme_test_commands(), ["make lint", "make test"])

    def test_ci_runs_exactly_the_readme_commands_in_order(self) -> None:
        readme = _readme_test_commands()
        ran = [command for command in _ci_commands() if command in readme]
        self.assertEqual(ran, readme, ".ci/run must run the README's test commands, in the same order")

    def test_makefile_has_the_targets(self) -> None:
        makefile = (ROOT / "Makefile").read_text()
        for target in ("test", "lint", "bench", "run"):
            self.assertRegex(makefile, rf"(?m)^{target}:", f"Makefile lacks a '{target}' target")


if __name__ == "__main__":
    unittest.main()
