# Gatehouse container image: build with the dev dependencies, run with production ones only.
#   docker build -t gatehouse .
#   docker run -p 80:80 -p 443:443 -v gatehouse-certs:/data -v $PWD/gatehouse.yaml:/etc/gatehouse/gatehouse.yaml:ro gatehouse
# In the config, set tls.storage: /data so certificates and account keys live in the volume.

FROM node:24-bookworm-slim AS build
WORKDIR /src
COPY package.json package-lock.json tsconfig.json ./
RUN npm ci --ignore-scripts
COPY src ./src
RUN npm run build

FROM node:24-bookworm-slim
ENV NODE_ENV=production
# glibc heap trimming for a proxy's buffer churn (README, Performance). Node >= 22.15 would restart
# itself with it; set here, the process starts with it and needs no restart.
ENV GLIBC_TUNABLES=glibc.malloc.trim_threshold=67108864
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --ignore-scripts && npm cache clean --force
COPY --from=build /src/dist ./dist
COPY config/default.yaml config/gatehouse.example.yaml ./config/
RUN mkdir -p /data /etc/gatehouse && chown node:node /data
# Binding 80/443 as a non-root user: Docker grants this through the
# net.ipv4.ip_unprivileged_port_start sysctl (0 in Docker's default namespace since 20.10).
USER node
VOLUME ["/data"]
EXPOSE 80 443
STOPSIGNAL SIGTERM
ENTRYPOINT ["node", "/app/dist/cli.js"]
CMD ["run", "--config", "/etc/gatehouse/gatehouse.yaml"]
