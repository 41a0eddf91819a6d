//! The only module that touches `aya::maps`. `Dataplane` is what the reconciler writes
//! through; `AyaDataplane` opens the pinned maps (so it works whether the agent that loaded
//! them is running or not), `FakeDataplane` keeps the same state in memory for tests.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use lb_common::{abi::*, maps, verdict::Reason};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("opening pinned map {path}: {source} (is the agent loaded with this --pin-dir?)")]
    Open { path: PathBuf, source: aya::maps::MapError },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: aya::maps::MapError },
    #[error("map {map}: index {index} out of range (capacity {capacity})")]
    OutOfRange { map: &'static str, index: u32, capacity: u32 },
}

type Result<T> = std::result::Result<T, DataplaneError>;

/// Writes and reads of the datapath state the agent owns.
pub trait Dataplane {
    fn set_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()>;
    fn remove_service(&mut self, key: &ServiceKey) -> Result<()>;
    fn set_backend(&mut self, id: u32, value: &BackendValue) -> Result<()>;
    /// Clears the slot (flags 0): the kernel then treats the id as gone.
    fn remove_backend(&mut self, id: u32) -> Result<()>;
    /// Writes backend ids into the Maglev array from `offset`.
    fn write_maglev(&mut self, offset: u32, ids: &[u32]) -> Result<()>;
    fn set_config(&mut self, config: &Config) -> Result<()>;
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>>;
    /// Backends in use (flags with `BE_F_PRESENT`).
    fn backends(&self) -> Result<Vec<(u32, BackendValue)>>;
    fn read_maglev(&self, offset: u32, len: u32) -> Result<Vec<u32>>;
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

/// The pinned maps of a loaded datapath.
pub struct AyaDataplane {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: Array<MapData, BackendValue>,
    maglev: Array<MapData, u32>,
    conntrack: HashMap<MapData, FlowKey, FlowValue>,
    config: Array<MapData, Config>,
    stats_reason: PerCpuArray<MapData, Counter>,
    stats_service: PerCpuArray<MapData, Counter>,
    stats_backend: PerCpuArray<MapData, Counter>,
}

fn open(dir: &Path, name: &'static str) -> Result<MapData> {
    let path = dir.join(name);
    MapData::from_pin(&path).map_err(|source| DataplaneError::Open { path, source })
}

impl AyaDataplane {
    /// Opens the maps pinned in `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self> {
        Ok(AyaDataplane {
            services: HashMap::try_from(Map::HashMap(open(pin_dir, maps::SERVICES)?)).map_err(map_err(maps::SERVICES))?,
            backends: Array::try_from(Map::Array(open(pin_dir, maps::BACKENDS)?)).map_err(map_err(maps::BACKENDS))?,
            maglev: Array::try_from(Map::Array(open(pin_dir, maps::MAGLEV)?)).map_err(map_err(maps::MAGLEV))?,
            conntrack: HashMap::try_from(Map::LruHashMap(open(pin_dir, maps::CONNTRACK)?))
                .map_err(map_err(maps::CONNTRACK))?,
            config: Array::try_from(Map::Array(open(pin_dir, maps::CONFIG)?)).map_err(map_err(maps::CONFIG))?,
            stats_reason: PerCpuArray::try_from(Map::PerCpuArray(open(pin_dir, maps::STATS_REASON)?))
                .map_err(map_err(maps::STATS_REASON))?,
            stats_service: PerCpuArray::try_from(Map::PerCpuArray(open(pin_dir, maps::STATS_SERVICE)?))
                .map_err(map_err(maps::STATS_SERVICE))?,
            stats_backend: PerCpuArray::try_from(Map::PerCpuArray(open(pin_dir, maps::STATS_BACKEND)?))
                .map_err(map_err(maps::STATS_BACKEND))?,
        })
    }

    /// Every flow-table entry.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>> {
        self.conntrack.iter().collect::<std::result::Result<_, _>>().map_err(map_err(maps::CONNTRACK))
    }

    pub fn flow(&self, key: &FlowKey) -> Option<FlowValue> {
        self.conntrack.get(key, 0).ok()
    }

    /// Drops every flow-table entry (tests, `lb conntrack flush`).
    pub fn flush_flows(&mut self) -> Result<usize> {
        let keys: Vec<FlowKey> =
            self.conntrack.keys().collect::<std::result::Result<_, _>>().map_err(map_err(maps::CONNTRACK))?;
        for k in &keys {
            let _ = self.conntrack.remove(k);
        }
        Ok(keys.len())
    }

    fn sum(map: &PerCpuArray<MapData, Counter>, name: &'static str, index: u32) -> Result<Counter> {
        let values = map.get(&index, 0).map_err(map_err(name))?;
        Ok(values.iter().fold(Counter::default(), |a, c| Counter {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
        }))
    }

    /// Counter of one verdict reason, summed over CPUs.
    pub fn reason_counter(&self, r: Reason) -> Result<Counter> {
        Self::sum(&self.stats_reason, maps::STATS_REASON, r as u32)
    }

    pub fn service_counter(&self, id: u32) -> Result<Counter> {
        Self::sum(&self.stats_service, maps::STATS_SERVICE, id)
    }

    pub fn backend_counter(&self, id: u32) -> Result<Counter> {
        Self::sum(&self.stats_backend, maps::STATS_BACKEND, id)
    }
}

impl Dataplane for AyaDataplane {
    fn set_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        self.services.insert(key, value, 0).map_err(map_err(maps::SERVICES))
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        self.services.remove(key).map_err(map_err(maps::SERVICES))
    }

    fn set_backend(&mut self, id: u32, value: &BackendValue) -> Result<()> {
        let capacity = self.backends.len();
        if id >= capacity {
            return Err(DataplaneError::OutOfRange { map: maps::BACKENDS, index: id, capacity });
        }
        self.backends.set(id, value, 0).map_err(map_err(maps::BACKENDS))
    }

    fn remove_backend(&mut self, id: u32) -> Result<()> {
        self.set_backend(id, &BackendValue::default())
    }

    fn write_maglev(&mut self, offset: u32, ids: &[u32]) -> Result<()> {
        let capacity = self.maglev.len();
        let end = offset as u64 + ids.len() as u64;
        if end > capacity as u64 {
            return Err(DataplaneError::OutOfRange { map: maps::MAGLEV, index: end as u32, capacity });
        }
        for (i, id) in ids.iter().enumerate() {
            self.maglev.set(offset + i as u32, id, 0).map_err(map_err(maps::MAGLEV))?;
        }
        Ok(())
    }

    fn set_config(&mut self, config: &Config) -> Result<()> {
        self.config.set(0, config, 0).map_err(map_err(maps::CONFIG))
    }

    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>> {
        self.services.iter().collect::<std::result::Result<_, _>>().map_err(map_err(maps::SERVICES))
    }

    fn backends(&self) -> Result<Vec<(u32, BackendValue)>> {
        let mut out = Vec::new();
        for (i, v) in self.backends.iter().enumerate() {
            let v = v.map_err(map_err(maps::BACKENDS))?;
            if v.flags & BE_F_PRESENT != 0 {
                out.push((i as u32, v));
            }
        }
        Ok(out)
    }

    fn read_maglev(&self, offset: u32, len: u32) -> Result<Vec<u32>> {
        (offset..offset + len).map(|i| self.maglev.get(&i, 0).map_err(map_err(maps::MAGLEV))).collect()
    }
}

/// In-memory stand-in with the same observable state, for reconciler tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FakeDataplane {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, BackendValue>,
    pub maglev: BTreeMap<u32, u32>,
    pub config: Config,
    /// Every write, in order, to check op ordering.
    pub log: Vec<String>,
}

impl Dataplane for FakeDataplane {
    fn set_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        self.log.push(format!("set_service {}:{}", key.ip(), key.port()));
        self.services.insert(*key, *value);
        Ok(())
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        self.log.push(format!("remove_service {}:{}", key.ip(), key.port()));
        self.services.remove(key);
        Ok(())
    }

    fn set_backend(&mut self, id: u32, value: &BackendValue) -> Result<()> {
        self.log.push(format!("set_backend {id}"));
        self.backends.insert(id, *value);
        Ok(())
    }

    fn remove_backend(&mut self, id: u32) -> Result<()> {
        self.log.push(format!("remove_backend {id}"));
        self.backends.remove(&id);
        Ok(())
    }

    fn write_maglev(&mut self, offset: u32, ids: &[u32]) -> Result<()> {
        self.log.push(format!("write_maglev {offset}+{}", ids.len()));
        for (i, id) in ids.iter().enumerate() {
            self.maglev.insert(offset + i as u32, *id);
        }
        Ok(())
    }

    fn set_config(&mut self, config: &Config) -> Result<()> {
        self.config = *config;
        Ok(())
    }

    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn backends(&self) -> Result<Vec<(u32, BackendValue)>> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn read_maglev(&self, offset: u32, len: u32) -> Result<Vec<u32>> {
        Ok((offset..offset + len).map(|i| self.maglev.get(&i).copied().unwrap_or(0)).collect())
    }
}
