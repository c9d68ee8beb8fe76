"""The sdist holds every file the extension and the package build from (all tracked sources under csrc/,
kernels/ and deqfuse/), plus the README and the changelog."""
import subprocess
import sys
import tarfile

path = sys.argv[1]
names = {n.split("/", 1)[1] for n in tarfile.open(path).getnames() if "/" in n}
tracked = subprocess.run(["git", "ls-files", "csrc", "kernels", "deqfuse"], capture_output=True, text=True,
                         check=True).stdout.split()
missing = [f for f in tracked + ["README.md", "CHANGELOG.md", "setup.py", "pyproject.toml"] if f not in names]
assert not missing, f"{path} lacks {missing}"
print(f"sdist {path}: {len(names)} files, every tracked source included")
