# m2pt-serve on a CUDA-capable base. Uses the same install script as the README (`scripts/setup.sh`); the build
# has no GPU to detect, so M2PT_TORCH=cuda asks for the CUDA torch build.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    VENV=/opt/m2pt/.venv M2PT_STORE=/data/bundles
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip curl make \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 m2pt
WORKDIR /opt/m2pt
COPY --chown=m2pt:m2pt . /opt/m2pt
RUN M2PT_TORCH=cuda bash scripts/setup.sh && mkdir -p /data/bundles && chown -R m2pt:m2pt /data /opt/m2pt
# Optional extras, e.g. `--build-arg EXTRAS=cluster` for Ray Serve (deploy/rayservice.yaml).
ARG EXTRAS=""
RUN if [ -n "$EXTRAS" ]; then $VENV/bin/pip install --no-cache-dir -c constraints.txt -e ".[$EXTRAS]"; fi

USER m2pt
ENV PATH=/opt/m2pt/.venv/bin:$PATH
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/health || exit 1
# Serves the shipped demo model; mount a store at /data/bundles and pass --store /data/bundles --model ... to change.
CMD ["m2pt", "serve", "--host", "0.0.0.0", "--port", "8000"]
