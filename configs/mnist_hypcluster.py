"""HypCluster (Mansour et al. 2020) with 2 clusters on MNIST-Dirichlet(0.3).

mnist_cnn_fedavg.py's task with two cluster models initialised k-means++
style from 10 locally trained clients; every client trains the cluster with
the lowest loss on its data, and evaluation scores each test client with the
cluster that fits its train split best (``eval_cluster_clients_<k>`` counts
the clients per cluster). Local compute is ~K times FedAvg's.
"""

from configs import common
from configs import mnist_cnn_fedavg


def get_config(mode: str = ""):
  config = mnist_cnn_fedavg.get_config()
  config.algorithm = "hypcluster"
  config.hypcluster.update({"num_clusters": 2, "init": "kmeans",
                            "init_clients": 10})
  return common.apply_mode(config, mode)
