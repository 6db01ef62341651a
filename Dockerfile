# The one image of Thynapse: `thynapse` (transmitter, rendezvous, sidecar, up) and
# `thynapse-operator`. The Helm chart's default image name is thynapse/thynapse:<appVersion>:
#   docker build -t thynapse/thynapse:0.1.0 .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p thynapse -p thynapse-operator \
 && cp target/release/thynapse target/release/thynapse-operator /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/thynapse /usr/local/bin/thynapse-operator /usr/local/bin/
# Non-root, as the chart's securityContext expects.
USER 65532:65532
ENTRYPOINT ["thynapse"]
