# The local base of components/Dockerfile where no registry is reachable: a Debian
# bookworm root filesystem made by mmdebstrap (components/build-image.sh), as an image.
# Elsewhere the base is debian:bookworm-slim pinned by digest (BASE_IMAGE).
FROM scratch
ADD rootfs.tar /
CMD ["/bin/bash"]
