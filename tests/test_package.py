"""
Tests of the package as a whole: layering rules, typing marker, metadata.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import types
from importlib.metadata import version
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

import pbroker
import pbroker.jelly

PACKAGE = Path(pbroker.__file__).parent

#: Modules that importing pbroker.pb must not load: each is imported when first needed.
LAZY_MODULES = frozenset(
    {
        "decimal",
        "pbroker.cred",
        "pbroker.passwords",
        "pbroker.tls",
        "twisted.cred.credentials",
        "twisted.cred.portal",
    }
)


def importedModules(path: Path) -> set[str]:
    """
    Every module name an ``import`` or ``from ... import`` in the file names.
    """
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


class PackageTests(SynchronousTestCase):
    def test_twistdPluginFound(self) -> None:
        """
        twistd finds the pbroker plugin where the suite runs: in the README's editable
        install too, which puts the checkout's twisted/plugins folder on the path (it used to
        be a folder of another name, mapped at install, that an editable install missed).
        """
        from twisted.application.service import IServiceMaker
        from twisted.plugin import getPlugins

        self.assertIn("pbroker", [maker.tapname for maker in getPlugins(IServiceMaker)])

    def test_neverImportsTwistedSpread(self) -> None:
        """No product module imports twisted.spread: pbroker is written independently."""
        sources = sorted(PACKAGE.rglob("*.py"))
        self.assertGreater(len(sources), 5)
        for path in sources:
            spread = {n for n in importedModules(path) if n.startswith("twisted.spread")}
            self.assertEqual(spread, set(), path.name)
            # Nor loads it by name (wire strings and docs may mention it; code may not).
            text = path.read_text(encoding="utf-8")
            for loader in ("import_module(", "__import__(", "namedAny(", "namedModule("):
                for line in text.splitlines():
                    if loader in line:
                        self.assertNotIn("spread", line, path.name)

    def test_importLoadsNoSpreadAndNoReactor(self) -> None:
        """Importing every pbroker module loads neither twisted.spread nor a reactor."""
        modules = sorted(
            "pbroker." + path.stem
            for path in PACKAGE.glob("*.py")
            if path.stem not in ("__init__", "__main__")  # __main__ runs the command line
        )
        script = (
            "import sys\n"
            + "".join(f"import {name}\n" for name in modules)
            + "bad = [m for m in sys.modules"
            " if m.startswith('twisted.spread') or m == 'twisted.internet.reactor']\n"
            "print(bad)\n"
        )
        output = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
        ).stdout
        self.assertEqual(output.strip(), "[]")

    def test_lazyImports(self) -> None:
        """Importing pbroker.pb and serving a plain root does not load what such a server
        never uses (decimal, twisted.cred and the logins, TLS); a decimal still travels both
        ways in a process that had not loaded it, and the lazily taken names of pb are still
        the classes of the modules that define them, and dir() lists them."""
        script = (
            "import sys\n"
            "import pbroker.pb\n"
            "from pbroker import jelly\n"
            "pbroker.pb.PBServerFactory(pbroker.pb.Root())\n"
            "print(sorted(m for m in sys.modules if m in {LAZY!r}))\n"
            "print({'Avatar', 'Portal', 'PBServerFactory'} <= set(dir(pbroker.pb)))\n"
            "value = jelly.unjelly([b'decimal', -125, -2])\n"
            "print(repr(value), jelly.jelly(value))\n"
            "from pbroker.pb import *\n"
            "import pbroker.tls\n"
            "print(CertificateLogin is pbroker.tls.CertificateLogin)\n"
            "import pbroker.cred\n"
            "print(Avatar is pbroker.cred.Avatar, respond is pbroker.cred.respond)\n"
        ).replace("{LAZY!r}", repr(LAZY_MODULES))
        output = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
        ).stdout.splitlines()
        self.assertEqual(
            output,
            ["[]", "True", "Decimal('-1.25') [b'decimal', -125, -2]", "True", "True True"],
        )

    def test_twistedPbNames(self) -> None:
        """
        Every public name of twisted.spread.pb an application uses is in pbroker.pb, so that
        porting is changing the import. Left out: the modules and helpers stock pb only
        imports for itself, and copyTags, an internal table of stock flavors.
        """
        from twisted.spread import pb as stock

        from pbroker import pb

        internal = {"cmp", "comparable", "implementer", "Interface", "registerAdapter", "md5"}
        internal |= {"copyTags"}
        missing = []
        for name in dir(stock):
            value = getattr(stock, name)
            if name.startswith("_") or name in internal:
                continue
            if isinstance(value, types.ModuleType) and name not in ("banana", "jelly"):
                continue
            if not hasattr(pb, name):
                missing.append(name)
        self.assertEqual(missing, [])
        self.assertIs(pb.setUnjellyableForClass, pbroker.jelly.setUnjellyableForClass)
        self.assertIs(pb.jelly, pbroker.jelly)

    def test_everyTwistedSpreadModule(self) -> None:
        """Each public module of twisted.spread has a pbroker module of the same name, with
        its public names, so that an import of any of them ports by changing the package.
        Left out: what a stock module only imports, copyTags (see test_twistedPbNames), and
        flavors' unjelly helpers for PB's reference tags, which the broker's own unjellier
        replaces."""
        import importlib
        import pkgutil

        import twisted.spread

        internal = {"copyTags", "unjellyCached", "unjellyLCache", "unjellyLocal"}
        missing = []
        for info in pkgutil.iter_modules(twisted.spread.__path__):
            if info.name.startswith("_") or info.name == "test":
                continue
            ours = importlib.import_module(f"pbroker.{info.name}")
            stock = importlib.import_module(f"twisted.spread.{info.name}")
            for name, value in vars(stock).items():
                defined = getattr(value, "__module__", stock.__name__) == stock.__name__
                if name.startswith("_") or name in internal or not defined:
                    continue
                if isinstance(value, types.ModuleType) or name == "TYPE_CHECKING":
                    continue
                if not hasattr(ours, name):
                    missing.append(f"{info.name}.{name}")
        self.assertEqual(missing, [])
        self.assertIs(
            importlib.import_module("pbroker.interfaces").IJellyable, pbroker.jelly.IJellyable
        )

    def test_publicMethodsDocumented(self) -> None:
        """Every public method of every public class has a docstring (its own, or the one it
        overrides), so that the API page says what each does."""
        import importlib
        import inspect
        import pkgutil

        missing = set()
        for info in pkgutil.iter_modules(pbroker.__path__):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"pbroker.{info.name}")
            for name in getattr(module, "__all__", []):
                cls = getattr(module, name)
                if not (inspect.isclass(cls) and cls.__module__.startswith("pbroker")):
                    continue
                for attribute in dir(cls):
                    static = inspect.getattr_static(cls, attribute)
                    kinds = (property, classmethod, staticmethod)
                    if attribute.startswith("_") or not (
                        inspect.isfunction(static) or isinstance(static, kinds)
                    ):
                        continue
                    owner = next(b for b in cls.__mro__ if attribute in vars(b))
                    if not owner.__module__.startswith("pbroker"):
                        continue
                    if not inspect.getdoc(getattr(cls, attribute)):
                        missing.add(f"{owner.__module__}.{owner.__qualname__}.{attribute}")
        self.assertEqual(sorted(missing), [])

    def test_codecLayerIsSansIO(self) -> None:
        """The codec and serialiser modules import nothing from twisted.internet but the
        Protocol base class of the Banana adapter."""
        for name in ("_jellycore.py", "_jellier.py", "_unjellier.py", "jelly.py", "errors.py"):
            internet = {n for n in importedModules(PACKAGE / name) if "twisted.internet" in n}
            self.assertEqual(internet, set(), name)
        internet = {
            n for n in importedModules(PACKAGE / "banana.py") if n.startswith("twisted.internet")
        }
        self.assertEqual(
            internet, {"twisted.internet.protocol", "twisted.internet.protocol.Protocol"}
        )

    def test_acceleratorBuilt(self) -> None:
        """The install built the C scan and the decoder uses it. Where no C compiler is at
        hand the install still succeeds without it; run the tests with PBROKER_PURE_PYTHON=1
        there."""
        if os.environ.get("PBROKER_PURE_PYTHON"):
            raise SkipTest("PBROKER_PURE_PYTHON is set: the pure-Python scan is in use")
        from pbroker import banana

        self.assertIsNot(
            banana._scan,
            banana._scanPython,
            "pbroker._speedups was not built (no C compiler or Python headers?)",
        )

    def test_sanitizeSeesSmallObjects(self) -> None:
        """.ci/sanitize runs its Python with PYTHONMALLOC=malloc (else a read past the end of
        an object under 512 bytes stays inside pymalloc's arena, unseen by AddressSanitizer)
        and with PBROKER_PURE_PYTHON unset (else the sanitized build goes unused and every
        test of it is skipped: a pass that checked nothing)."""
        script = PACKAGE.parent / ".ci" / "sanitize"
        if not script.exists():
            raise SkipTest("not run from a checkout")
        lines = script.read_text().splitlines()
        runs = [line for line in lines if "LD_PRELOAD=" in line]
        self.assertTrue(runs)
        for line in runs:
            self.assertIn("PYTHONMALLOC=malloc", line)
        self.assertIn("unset PBROKER_PURE_PYTHON", lines)

    def test_byteOrderGiven(self) -> None:
        """Every ``to_bytes``/``from_bytes`` call in the package, its tests and its benchmarks
        names its byte order: the argument is optional only from Python 3.11, and pbroker and
        its suite support 3.10 (test_splice's fuzz helpers once left it out, and failed there
        with a TypeError)."""
        root = PACKAGE.parent
        missing = []
        for folder in ("pbroker", "tests", "bench"):
            for path in sorted((root / folder).rglob("*.py")):
                tree = ast.parse(path.read_text(encoding="utf-8"))
                for node in ast.walk(tree):
                    if (
                        isinstance(node, ast.Call)
                        and isinstance(node.func, ast.Attribute)
                        and node.func.attr in ("to_bytes", "from_bytes")
                        and len(node.args) < 2
                        and "byteorder" not in {keyword.arg for keyword in node.keywords}
                    ):
                        missing.append(f"{path.relative_to(root)}:{node.lineno}")
        self.assertEqual(missing, [])

    def test_typed(self) -> None:
        """The package ships its py.typed marker."""
        self.assertTrue((PACKAGE / "py.typed").exists())

    def test_versionFromMetadata(self) -> None:
        """The version comes from the installed metadata, whose source is pyproject.toml."""
        self.assertEqual(pbroker.__version__, version("pbroker"))
