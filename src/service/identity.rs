//! CSI Identity service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi::{self, identity_server::Identity};
use crate::error::Error;
use crate::rpc_span;
use crate::service::Driver;

pub struct IdentityService {
    driver: Arc<Driver>,
}

impl IdentityService {
    pub fn new(driver: Arc<Driver>) -> Self {
        IdentityService { driver }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    /// GetPluginInfo: name in domain notation (≤ 63 characters) and a vendor version. REQUIRED.
    async fn get_plugin_info(
        &self,
        _request: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        let reply = csi::GetPluginInfoResponse {
            name: self.driver.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        };
        self.driver.answer(rpc_span!("GetPluginInfo"), Ok(reply))
    }

    /// GetPluginCapabilities: the Controller and GroupController services, volumes that are
    /// only accessible from the node that made them (VOLUME_ACCESSIBILITY_CONSTRAINTS),
    /// changed-block tracking (SNAPSHOT_METADATA_SERVICE, served on the same socket), and
    /// ONLINE volume expansion.
    async fn get_plugin_capabilities(
        &self,
        _request: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        use csi::plugin_capability::service::Type;
        let service = |kind: Type| csi::PluginCapability {
            r#type: Some(csi::plugin_capability::Type::Service(
                csi::plugin_capability::Service {
                    r#type: kind as i32,
                },
            )),
        };
        let online_expansion = csi::PluginCapability {
            r#type: Some(csi::plugin_capability::Type::VolumeExpansion(
                csi::plugin_capability::VolumeExpansion {
                    r#type: csi::plugin_capability::volume_expansion::Type::Online as i32,
                },
            )),
        };
        let reply = csi::GetPluginCapabilitiesResponse {
            capabilities: vec![
                service(Type::ControllerService),
                service(Type::VolumeAccessibilityConstraints),
                service(Type::GroupControllerService),
                service(Type::SnapshotMetadataService),
                online_expansion,
            ],
        };
        self.driver
            .answer(rpc_span!("GetPluginCapabilities"), Ok(reply))
    }

    /// Probe: ready=false while startup recovery runs; an error (FAILED_PRECONDITION) when
    /// recovery failed and the driver cannot serve.
    async fn probe(
        &self,
        _request: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        let result = self
            .driver
            .probe()
            .map(|ready| csi::ProbeResponse { ready: Some(ready) })
            .map_err(|reason| Error::RecoveryFailed { reason });
        self.driver.answer(rpc_span!("Probe"), result)
    }
}
