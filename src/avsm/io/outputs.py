"""All-or-nothing writing of output files.

:class:`OutputTransaction` stages every output of a run in a hidden staging
folder inside the output's own directory (so the final ``os.replace`` is an
atomic rename on the same file system) and moves them into place only when the
whole run succeeded.  A crash or an exception leaves no partial outputs behind.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from types import TracebackType

from avsm.errors import AvsmError

__all__ = ["OutputTransaction", "atomic_write_text", "STAGING_PREFIX"]

logger = logging.getLogger(__name__)

#: Prefix of the hidden staging folders created next to the outputs.
STAGING_PREFIX = ".avsm-tmp-"

PathLike = str | os.PathLike[str]


def _real(path: PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _same_file(a: PathLike, b: PathLike) -> bool:
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class OutputTransaction:
    """Context manager that writes a set of output files all-or-nothing.

    Example::

        with OutputTransaction(inputs=[fixed_path, moving_path]) as tx:
            save_image(warped, tx.path("out/warped.nii.gz"))
            atomic_write_text(tx.path("out/report.json"), text)
        # here both files exist; after an exception neither does

    :meth:`path` returns a temporary path with the **same file name** as the
    final one, inside a hidden staging folder ``<dir>/.avsm-tmp-XXXX/`` of the
    final directory (so formats with a detached data file, ``.mhd``/``.raw``
    or ``.nhdr``, keep consistent names).  On a clean exit every file in the
    staging folders is moved into place with ``os.replace``; on an exception
    the staging folders are deleted and no final file is created or changed.

    Args:
        inputs: input files that no output may overwrite.

    Raises:
        AvsmError: (from :meth:`path`) an output would overwrite an input, is a
            directory, or its directory cannot be created or written.
    """

    def __init__(self, inputs: Iterable[PathLike] = ()) -> None:
        self._inputs: list[str] = [os.fspath(p) for p in inputs]
        self._stages: dict[str, str] = {}  # real output dir -> staging dir
        self._finals: dict[str, tuple[str, str]] = {}  # real final -> (final as given, temp)
        self._open = True

    # -------------------------------------------------------------- context manager

    def __enter__(self) -> OutputTransaction:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.rollback()
        return False

    # -------------------------------------------------------------- API

    @property
    def finals(self) -> list[str]:
        """Final paths requested so far, as given."""
        return [given for given, _ in self._finals.values()]

    def path(self, final: PathLike) -> str:
        """Temporary path to write instead of ``final``.

        Args:
            final: the output path wanted in the end.

        Returns:
            A path in a staging folder of ``final``'s directory with the same
            file name (hence the same extension).  Asking twice for the same
            final path returns the same temporary path.
        """
        if not self._open:
            raise RuntimeError("OutputTransaction is already finished")
        final_s = os.fspath(final)
        if not os.path.basename(final_s):
            raise AvsmError("output path names a directory, not a file", final_s)
        key = _real(final_s)
        if key in self._finals:
            return self._finals[key][1]
        for inp in self._inputs:
            if _same_file(final_s, inp):
                raise AvsmError("output would overwrite an input file", final_s)
        if os.path.isdir(final_s):
            raise AvsmError("output path is an existing directory", final_s)
        stage = self._stage_for(os.path.dirname(key))
        tmp = os.path.join(stage, os.path.basename(key))
        self._finals[key] = (final_s, tmp)
        return tmp

    def commit(self) -> None:
        """Move every staged file into place (called on a clean ``with`` exit).

        Raises:
            AvsmError: a requested output was never written, or a rename failed
                (in which case the outputs already moved by this commit are
                removed again, best effort).
        """
        if not self._open:
            return
        for given, tmp in self._finals.values():
            if not os.path.exists(tmp):
                self.rollback()
                raise AvsmError("output was not written", given)
        moved: list[str] = []
        try:
            for outdir, stage in self._stages.items():
                for name in sorted(os.listdir(stage)):
                    dst = os.path.join(outdir, name)
                    os.replace(os.path.join(stage, name), dst)
                    moved.append(dst)
        except OSError as e:
            for dst in moved:
                try:
                    os.remove(dst)
                except OSError:
                    logger.warning("could not remove partial output %s", dst)
            self.rollback()
            raise AvsmError(f"could not move output into place: {e.strerror or e}", e.filename) from e
        for dst in moved:
            logger.debug("wrote %s", dst)
        self._cleanup()

    def rollback(self) -> None:
        """Delete all staged files; no final file is created."""
        if not self._open:
            return
        self._cleanup()

    # -------------------------------------------------------------- internals

    def _cleanup(self) -> None:
        for stage in self._stages.values():
            shutil.rmtree(stage, ignore_errors=True)
        self._stages.clear()
        self._open = False

    def _stage_for(self, outdir: str) -> str:
        if outdir in self._stages:
            return self._stages[outdir]
        try:
            os.makedirs(outdir, exist_ok=True)
        except OSError as e:
            raise AvsmError(
                f"cannot create output directory: {e.strerror or e}", outdir
            ) from e
        if not os.access(outdir, os.W_OK | os.X_OK):
            raise AvsmError("output directory is not writable", outdir)
        try:
            stage = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=outdir)
        except OSError as e:
            why = "output directory is not writable" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) \
                else f"cannot write to output directory: {e.strerror or e}"
            raise AvsmError(why, outdir) from e
        self._stages[outdir] = stage
        return stage


def atomic_write_text(path: PathLike, text: str, *, encoding: str = "utf-8") -> None:
    """Write a text file atomically (temporary file in the same directory, then rename).

    Args:
        path: final file path; its directory is created if missing.
        text: file contents.
        encoding: text encoding.

    Raises:
        AvsmError: the directory cannot be created or written.
    """
    with OutputTransaction() as tx:
        tmp = tx.path(path)
        with open(tmp, "w", encoding=encoding) as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
