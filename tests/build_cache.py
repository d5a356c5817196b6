"""Where the tests keep what they compile (native test binaries built from the project's C++
and CUDA sources): one folder per kind under the user's cache, overridable by an environment
variable, so that a second test run reuses the first one's builds."""
import os


def build_cache_dir(env_var: str, kind: str) -> str:
    """``$env_var`` if set, else ``$XDG_CACHE_HOME/capsnet_ext/<kind>`` (``~/.cache`` without
    XDG_CACHE_HOME); created if missing."""
    root = os.environ.get(env_var) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "capsnet_ext",
        kind)
    os.makedirs(root, exist_ok=True)
    return root
