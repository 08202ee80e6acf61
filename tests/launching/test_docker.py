"""launch/docker/*.Dockerfile and .dockerignore, checked without Docker: pins agree with
pyproject.toml, COPY sources exist and are not ignored, the installed packages are all copied, no
ENTRYPOINT, the repository lives at /app. (The images are not built here.)
"""

import fnmatch
import os
import re
import shlex
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCKER = os.path.join(ROOT, "launch", "docker")
IMAGES = ("train-tpu", "train-gpu", "data-prep-gpu")


def _instructions(name):
  """[(INSTRUCTION, argument text)] with comments dropped and '\\' continuations joined."""
  out, cur = [], ""
  with open(os.path.join(DOCKER, f"{name}.Dockerfile")) as f:
    for line in f:
      s = line.rstrip("\n")
      if not cur and (not s.strip() or s.lstrip().startswith("#")):
        continue
      if s.rstrip().endswith("\\"):
        cur += s.rstrip()[:-1] + " "
        continue
      cur += s
      word, _, rest = cur.strip().partition(" ")
      out.append((word.upper(), rest.strip()))
      cur = ""
  assert not cur, f"{name}: dangling continuation"
  return out


def _pyproject():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def _pins(requirements):
  """{'jax': '0.10.2', ...} for the '==' pins of a requirement list (extras dropped)."""
  pins = {}
  for r in requirements:
    m = re.match(r"^\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*==\s*([^\s;,]+)", r)
    if m:
      pins[m.group(1).lower()] = m.group(3)
  return pins


def _pip_installs(instrs):
  """Requirement strings of every `pip install` in RUN lines (options and '.'-paths dropped)."""
  reqs = []
  for word, rest in instrs:
    if word != "RUN":
      continue
    lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    cmds, cur = [], []
    for tok in lexer:  # quotes respected; '&&' and ';' separate commands
      if tok in ("&&", ";", "||"):
        cmds.append(cur)
        cur = []
      else:
        cur.append(tok)
    for toks in [*cmds, cur]:
      if len(toks) >= 2 and toks[0] in ("pip", "pip3") and toks[1] == "install":
        skip = False
        for t in toks[2:]:
          if skip:
            skip = False
          elif t in ("-f", "--find-links", "-i", "--index-url", "--extra-index-url", "-r"):
            skip = True
          elif not t.startswith("-"):
            reqs.append(t)
  return reqs


def _dockerignore():
  with open(os.path.join(ROOT, ".dockerignore")) as f:
    return [l.strip() for l in f if l.strip() and not l.startswith("#")]


def _ignored(path, patterns):
  """Top-level .dockerignore semantics, enough for these patterns (no '!' exceptions here)."""
  for p in patterns:
    p = p.rstrip("/")
    if p.startswith("**/"):
      if any(fnmatch.fnmatch(part, p[3:]) for part in path.split("/")):
        return True
    elif fnmatch.fnmatch(path, p) or path.startswith(p + "/"):
      return True
  return False


@pytest.mark.parametrize("name", IMAGES)
def test_dockerfile_pins_match_pyproject(name):
  proj = _pyproject()
  core = _pins(proj["project"]["dependencies"])
  data = _pins(proj["project"]["optional-dependencies"]["data"])
  instrs = _instructions(name)
  pins = _pins(_pip_installs(instrs))
  if name.startswith("train"):
    assert pins["jax"] == core["jax"] == core["jaxlib"]
    extra = "tpu" if name == "train-tpu" else "cuda12"
    assert any(r.startswith(f"jax[{extra}]==") for r in _pip_installs(instrs))
  else:
    assert pins["torch"] == data["torch"] and pins["torchaudio"] == data["torchaudio"]
  # Nothing is pinned differently from pyproject.toml.
  for pkg, version in pins.items():
    if pkg in core or pkg in data:
      assert version == {**core, **data}[pkg], (name, pkg)
  # The repository's own install: '.' for training, '.[data]' for data prep.
  own = [r for r in _pip_installs(instrs) if r.startswith(".")]
  assert own == (["."] if name.startswith("train") else [".[data]"])


@pytest.mark.parametrize("name", IMAGES)
def test_dockerfile_layout(name):
  instrs = _instructions(name)
  words = [w for w, _ in instrs]
  assert words[0] == "FROM" and instrs[0][1] == "python:3.11-slim"
  assert _pyproject()["project"]["requires-python"].startswith(">=3.11")
  assert "ENTRYPOINT" not in words and "CMD" not in words
  assert ("WORKDIR", "/app") in instrs
  env = " ".join(rest for w, rest in instrs if w == "ENV")
  assert ("HF_HUB_OFFLINE=1" in env) == (name == "data-prep-gpu")


@pytest.mark.parametrize("name", IMAGES)
def test_copy_sources_exist_are_not_ignored_and_cover_the_packages(name):
  patterns = _dockerignore()
  copied = []
  for word, rest in _instructions(name):
    if word in ("COPY", "ADD"):
      toks = [t for t in shlex.split(rest) if not t.startswith("--")]
      for src in toks[:-1]:
        assert os.path.exists(os.path.join(ROOT, src)), f"{name}: COPY {src} is not in the repo"
        assert not _ignored(src, patterns), f"{name}: COPY {src} is excluded by .dockerignore"
        copied.append(src.rstrip("/"))
  proj = _pyproject()
  assert proj["project"]["readme"] in copied and "pyproject.toml" in copied
  for pattern in proj["tool"]["setuptools"]["packages"]["find"]["include"]:
    assert pattern.rstrip("*") in copied, f"{name}: package {pattern} is not copied"


def test_dockerignore_excludes_environments_outputs_and_git():
  patterns = _dockerignore()
  for path in (".venv", ".venv/lib/python3.11/site-packages/jax/__init__.py", ".git/HEAD",
               "workdir/mse_1b6_tiny/checkpoints", "data/synthetic/manifest.json",
               "lcm_jax/__pycache__/main.cpython-311.pyc", ".pytest_cache"):
    assert _ignored(path, patterns), path
  for path in ("lcm_jax/main.py", "data_prep/embed.py", "configs/base.py", "pyproject.toml",
               "README.md", "launch/gke/render.py"):
    assert not _ignored(path, patterns), path


def test_data_prep_image_links_the_bundled_libsndfile():
  """fairseq2n loads libsndfile.so.1: the image links soundfile's copy into the library path,
  as scripts/setup.sh does for .venv/lib."""
  runs = " ".join(rest for w, rest in _instructions("data-prep-gpu") if w == "RUN")
  assert "_soundfile_data" in runs and "/usr/local/lib/libsndfile.so.1" in runs
  assert "ldconfig" in runs
  with open(os.path.join(ROOT, "scripts", "setup.sh")) as f:
    assert "libsndfile.so.1" in f.read()
