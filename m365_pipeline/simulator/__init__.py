"""``m365-simulate``: both vendor APIs (source S and source B) on loopback, from deterministic data.

    from m365_pipeline.simulator import Simulator, SimulatorConfig, FaultConfig, ground_truth
    with Simulator(SimulatorConfig(orgs=5, users_per_org=10, seed=1), port=0) as sim:
        sim.env          # SAAS_API_BASE_URL, SAAS_API_TOKEN, BACKUP_API_BASE_URL, BACKUP_*_TOKEN
        sim.dataset      # iterators over everything served
        sim.stats()      # requests per endpoint kind, faults per kind, responses per status
    truth = ground_truth(sim.dataset)   # docs/RULES.md rules 1-10 applied to the same data

``dataset.py`` documents the data layout, ``faults.py`` the fault semantics, ``truth.py`` how the
contract's open points are interpreted.
"""

from m365_pipeline.simulator.dataset import Dataset, SimulatorConfig
from m365_pipeline.simulator.faults import FaultConfig
from m365_pipeline.simulator.server import Simulator
from m365_pipeline.simulator.truth import ground_truth

__all__ = ["Dataset", "FaultConfig", "Simulator", "SimulatorConfig", "ground_truth"]
