# syntax=docker/dockerfile:1.7
#
# The `iro` image: one binary for `iro coordinator` and `iro worker` (k8s/), with the libtorch it links.
#
#   docker build -t REGISTRY/iro:0.1.0-cuda .                             # GPU workers (default)
#   docker build --build-arg IRO_TORCH=slim -t REGISTRY/iro:0.1.0-cpu .   # CPU only (cpu-demo), ~4x smaller
#
# Needs BuildKit (the default builder of Docker 23+) and, while building, PyPI, crates.io, Debian's
# mirrors and static.rust-lang.org (rustup). No GPU is needed to build either flavour.
#
# Layout inside the image (the binary's rpath is fixed at build time, so the build happens at the same
# path the runtime uses):
#   /usr/local/bin/iro                the binary; RUNPATH /opt/iro/.deps/libtorch/lib
#   /opt/iro/.deps/libtorch/lib/      libtorch's shared libraries (from PyPI's torch wheel)
#   /opt/iro/.deps/nvidia/*/lib/      the CUDA/cuDNN/NCCL libraries of the wheel (full: all; slim: cudart +
#                                     cupti, which libtorch_cpu links even on CPU); libtorch finds them
#                                     through its own $ORIGIN/../../nvidia/... rpath
# LD_LIBRARY_PATH adds libtorch's folder (belt and braces) and NCCL's, because cudarc opens `libnccl.so`
# by name at run time and dlopen by name does not search libtorch's rpath.
#
# The NVIDIA driver (libcuda.so.1) is not in the image: the NVIDIA container toolkit mounts the host's
# into GPU pods. CUDA 13 (torch 2.13's wheels) needs a driver of the 580 series or newer.

ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE} AS builder

# The workspace's toolchain (Cargo.toml: rust-version = "1.95"; toolchain.md: built and tested with 1.95).
ARG RUST_VERSION=1.95.0
# full: PyTorch's CUDA build and its NVIDIA libraries (GPU workers); slim: CPU-only libtorch.
ARG IRO_TORCH=full

ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates curl build-essential cmake pkg-config python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:$PATH
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
      | sh -s -- -y --no-modify-path --profile minimal --default-toolchain "${RUST_VERSION}" \
 && rustc --version && cargo --version

WORKDIR /opt/iro

# libtorch first, from scripts/setup.sh alone: this 1.3 GB (slim) / 4.7 GB (full) layer is rebuilt only
# when setup.sh or the flavour changes, not on every source edit. IRO_TORCH is set explicitly because
# there is no nvidia-smi in a build container to detect a GPU by.
COPY scripts/setup.sh scripts/setup.sh
RUN --mount=type=cache,target=/root/.cache/pip \
    case "${IRO_TORCH}" in full|slim) ;; *) echo "IRO_TORCH must be full or slim, not '${IRO_TORCH}'" >&2; exit 1;; esac \
 && IRO_TORCH="${IRO_TORCH}" bash scripts/setup.sh

# The sources (.dockerignore keeps target/, .deps/, assets/, runs/ out, so .deps/ above survives).
COPY . .

# A full build force-links libtorch_cuda.so (else CUDA silently reports unavailable); a slim one must not
# (build/libtorch_rpath.rs). setup.sh's .deps/cuda-link marker says the same; IRO_LINK_CUDA makes it explicit.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    set -eu; \
    if [ "${IRO_TORCH}" = full ]; then export IRO_LINK_CUDA=1; else export IRO_LINK_CUDA=0; fi; \
    cargo build --release --locked --bin iro; \
    if ! readelf -d target/release/iro | grep -Eq 'R(UN)?PATH.*/opt/iro/\.deps/libtorch/lib'; then \
      echo "target/release/iro lacks the rpath /opt/iro/.deps/libtorch/lib:" >&2; \
      readelf -d target/release/iro | grep -i path >&2; exit 1; \
    fi

# Assemble what the runtime needs under /stage, with the same absolute paths it will have there. The
# wheel's site-packages layout (torch/lib next to nvidia/) is kept as .deps/libtorch/lib next to
# .deps/nvidia, so libtorch's $ORIGIN/../../nvidia/... rpath still resolves. Headers, static libraries
# and Python files are left behind.
RUN set -eu; \
    site="$(.deps/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"; \
    stage=/stage/opt/iro/.deps; \
    mkdir -p "$stage/libtorch" /stage/usr/local/bin; \
    cp -a "$site/torch/lib" "$stage/libtorch/lib"; \
    cp -a "$site/nvidia" "$stage/nvidia"; \
    find "$stage" \( -name include -o -name __pycache__ \) -type d -prune -exec rm -rf {} +; \
    find "$stage" \( -name '*.a' -o -name '*.py' -o -name '*.pyc' \) -type f -delete; \
    nccl="$stage/nvidia/nccl/lib"; \
    if [ -f "$nccl/libnccl.so.2" ]; then ln -sfn libnccl.so.2 "$nccl/libnccl.so"; fi; \
    install -m 0755 target/release/iro /stage/usr/local/bin/iro; \
    du -sh "$stage"

# ---------------------------------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime

ARG IRO_TORCH=full

# ca-certificates: S3 over HTTPS (rustls with the system's roots). tini: PID 1 that forwards the stop
# signal and reaps children. libgomp1/libstdc++6: libtorch's C++ and OpenMP runtimes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tini libgomp1 libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 iro \
 && useradd --system --uid 10001 --gid iro --home-dir /home/iro --create-home --shell /usr/sbin/nologin iro

COPY --from=builder /stage/ /

ENV LD_LIBRARY_PATH=/opt/iro/.deps/libtorch/lib:/opt/iro/.deps/nvidia/nccl/lib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Fails the build when a library the binary links is missing from the image. The driver's own libraries
# (libcuda, libnvidia-*) are exempt: the NVIDIA container toolkit brings them at run time. Where none of
# those is needed at load time, the binary must also start here.
RUN set -eu; linked="$(ldd /usr/local/bin/iro)"; \
    missing="$(echo "$linked" | grep 'not found' | grep -Ev 'libcuda\.so|libnvidia-' || true)"; \
    if [ -n "$missing" ]; then echo "iro: libraries missing from the image:" >&2; echo "$missing" >&2; exit 1; fi; \
    if echo "$linked" | grep -q 'not found'; then echo "iro: start check skipped (needs the NVIDIA driver)"; \
    else iro --version; fi

LABEL org.opencontainers.image.title="iro" \
      org.opencontainers.image.description="IRO alignment of frozen LLMs: coordinator and workers" \
      org.opencontainers.image.licenses="Apache-2.0" \
      iro.libtorch="2.13.0-${IRO_TORCH}"

USER 10001:10001
WORKDIR /home/iro
# Both `iro coordinator` and `iro worker` stop gracefully on SIGTERM and on SIGINT; SIGINT is kept as the
# stop signal so older images' behaviour is unchanged.
STOPSIGNAL SIGINT
EXPOSE 50051 8080
ENTRYPOINT ["/usr/bin/tini", "--", "iro"]
CMD ["--help"]
