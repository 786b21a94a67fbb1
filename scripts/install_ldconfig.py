#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""meson install script: refresh the dynamic loader's cache after a system
install, so that programs linked with `pkg-config --libs resa` (and the
installed resa-bench) find libresa.so.0 with no environment variables.

    usage: install_ldconfig.py LIBDIR   (absolute, as configured)

Runs `ldconfig` only when all of these hold, else says why it skips:
  - not staging into DESTDIR (a package build runs ldconfig on the target);
  - LIBDIR is a directory the dynamic loader searches (`ldconfig -v -N -X`
    lists it: /usr/local/lib/<multiarch>, /usr/lib/<multiarch>, ...);
  - running as root (only root can write /etc/ld.so.cache).
Never fails the install: a skipped or failed ldconfig is a message."""
import os
import shutil
import subprocess
import sys


def loader_dirs(ldconfig):
    """The directories ldconfig searches, resolved (merged /usr included)."""
    out = subprocess.run([ldconfig, "-v", "-N", "-X"], capture_output=True, text=True,
                         check=False).stdout
    dirs = set()
    for line in out.splitlines():
        if line and not line[0].isspace() and ":" in line:
            dirs.add(os.path.realpath(line.split(":", 1)[0]))
    return dirs


def main():
    libdir = sys.argv[1]
    say = lambda why: print(f"resa: not running ldconfig: {why}")  # noqa: E731
    if os.environ.get("MESON_INSTALL_DRY_RUN"):
        return say("dry run")
    if os.environ.get("DESTDIR"):
        return say(f"staging into DESTDIR={os.environ['DESTDIR']} (run it on the target)")
    ldconfig = shutil.which("ldconfig") or next(
        (p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.access(p, os.X_OK)), None)
    if not ldconfig:
        return say("no ldconfig on this system")
    if os.path.realpath(libdir) not in loader_dirs(ldconfig):
        return say(f"{libdir} is not a directory the dynamic loader searches; "
                   "link with -Wl,-rpath," + libdir + " or set LD_LIBRARY_PATH")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return say(f"not root; run `sudo ldconfig` so that programs find libresa in {libdir}")
    r = subprocess.run([ldconfig], check=False)
    if r.returncode != 0:
        return say(f"ldconfig failed with status {r.returncode}")
    print(f"resa: ran ldconfig: libresa in {libdir} is in the loader's cache")
    return None


if __name__ == "__main__":
    main()
    sys.exit(0)
