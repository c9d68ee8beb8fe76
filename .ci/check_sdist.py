"""The sdist holds every file the extension and the package build from (all tracked sources under csrc/,
kernels/ and deqfuse/, plus setup.py and pyproject.toml), byte for byte as in the checkout, and the README and
the changelog: so a build from the checkout is a build from the sdist."""
import subprocess
import sys
import tarfile

path = sys.argv[1]
tar = tarfile.open(path)
members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
tracked = subprocess.run(["git", "ls-files", "csrc", "kernels", "deqfuse"], capture_output=True, text=True,
                         check=True).stdout.split()
needed = tracked + ["README.md", "CHANGELOG.md", "setup.py", "pyproject.toml"]
missing = [f for f in needed if f not in members]
assert not missing, f"{path} lacks {missing}"
differ = [f for f in needed if tar.extractfile(members[f]).read() != open(f, "rb").read()]
assert not differ, f"{path} holds other contents than the checkout for {differ}"
print(f"sdist {path}: {len(members)} files, every tracked source included, byte for byte")
