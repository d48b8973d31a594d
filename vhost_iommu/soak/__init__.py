"""The soak (docs/soak.md): a guest's mixed workload for a long time against a vhost-iommu back-end process,
whose memory, fds, threads and CPU time are sampled; the verdict is whether they stayed flat.

``measure`` holds the figures and the verdict (pure functions), ``run`` the processes and the guest,
``report`` the files, ``__main__`` the command line (``scripts/soak``).
"""
