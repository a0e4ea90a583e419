# image: ghcr.io/scout-llm/scout
# The CPU image the k8s/ manifests name by default (coordinator, KV store nodes, CPU workers): the
# CPU build with the fixture pair under /opt/scout/models. GPU workers run Dockerfile.cuda's image.
# Not built on the development machines (no container engine there; CI lints this file):
# `docker build -t scout .` elsewhere.
FROM debian:12
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY . /src
WORKDIR /src
RUN bash tools/setup.sh \
 && cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DSCOUT_BUILD_TESTS=OFF \
 && ninja -C build scout scout-bench \
 && install -D build/bin/scout /usr/local/bin/scout \
 && install -D build/bin/scout-bench /usr/local/bin/scout-bench \
 && mkdir -p /opt/scout && cp -r models /opt/scout/models \
 && rm -rf /src/build /var/lib/apt/lists/*
WORKDIR /
ENTRYPOINT ["scout"]
CMD ["--help"]
