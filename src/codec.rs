//! The gRPC codec of the CSI services: tonic-prost's, except that a message that cannot be
//! decoded is INVALID_ARGUMENT. tonic-prost maps every decode error to INTERNAL, so a request
//! with, say, a non-UTF-8 `target_path` (protobuf `string` fields must be UTF-8) was answered
//! INTERNAL before any handler ran; the CSI spec wants INVALID_ARGUMENT for a malformed request.
//! The codec is named in build.rs (`codec_path`).

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// tonic-prost's codec with the decode error mapped as the module doc says.
pub struct CsiCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for CsiCodec<T, U> {
    fn default() -> Self {
        CsiCodec(ProstCodec::default())
    }
}

impl<T, U> Codec for CsiCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CsiDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        CsiDecoder(self.0.decoder())
    }
}

/// tonic-prost's decoder, with INVALID_ARGUMENT for a message it cannot decode.
pub struct CsiDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for CsiDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // prost's message names the message, the field and the fault, e.g.
        // "NodePublishVolumeRequest.target_path: invalid string value: data is not UTF-8 encoded".
        self.0.decode(buf).map_err(|status| {
            Status::invalid_argument(format!(
                "the request is not a valid CSI message: {}",
                status.message()
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
