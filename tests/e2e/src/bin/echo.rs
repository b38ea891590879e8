//! Test application that shows what reached it. In HTTP mode it responds to every request
//! with 200 and a JSON body describing the request and the connection:
//! `{"method", "path", "query", "headers": {name: [values]}, "body", "peer", "local"}`.
//! It prints one line per HTTP request to stdout. In TCP mode it writes back every byte
//! it reads, for pass-through tests.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
#[command(
    name = "echo",
    about = "Test application: HTTP request echo and raw TCP echo"
)]
#[command(group = clap::ArgGroup::new("mode").required(true).multiple(true))]
struct Args {
    /// Address to serve HTTP on. Every request gets status 200 and a JSON description of it.
    #[arg(long, value_name = "ADDR", group = "mode")]
    listen: Option<SocketAddr>,
    /// Address to serve a raw TCP echo on.
    #[arg(long, value_name = "ADDR", group = "mode")]
    tcp_echo: Option<SocketAddr>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut servers = tokio::task::JoinSet::new();
    if let Some(addr) = args.listen {
        let listener = bind(addr).await?;
        println!("echo: serving HTTP on {addr}");
        servers.spawn(serve_http(listener));
    }
    if let Some(addr) = args.tcp_echo {
        let listener = bind(addr).await?;
        println!("echo: serving TCP echo on {addr}");
        servers.spawn(serve_tcp_echo(listener));
    }
    // The servers only return on an accept error, which ends the program.
    if let Some(result) = servers.join_next().await {
        result.context("server task panicked")??;
    }
    Ok(())
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("failed to listen on {addr}"))
}

async fn serve_http(listener: TcpListener) -> Result<()> {
    loop {
        let (stream, peer) = listener
            .accept()
            .await
            .context("failed to accept an HTTP connection")?;
        let local = stream
            .local_addr()
            .context("failed to read the connection's local address")?;
        tokio::spawn(async move {
            let service = service_fn(move |request| describe(request, peer, local));
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("echo: HTTP connection from {peer} failed: {error}");
            }
        });
    }
}

/// Builds a 200 response with a JSON description of the request, the peer and the local address.
async fn describe(
    request: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    // One stdout line per request, so tests can check whether a request reached the app.
    println!("echo: {} {} from {peer}", parts.method, parts.uri.path());
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers
            .entry(name.as_str().to_owned())
            .or_default()
            .push(value);
    }
    let body = match body.collect().await {
        Ok(collected) => String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
        Err(error) => format!("<failed to read the request body: {error}>"),
    };
    let description = json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body": body,
        "peer": peer.to_string(),
        "local": local.to_string(),
    });
    let mut response = Response::new(Full::new(Bytes::from(description.to_string())));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

async fn serve_tcp_echo(listener: TcpListener) -> Result<()> {
    loop {
        let (stream, peer) = listener
            .accept()
            .await
            .context("failed to accept a TCP connection")?;
        tokio::spawn(async move {
            if let Err(error) = echo_bytes(stream).await {
                eprintln!("echo: TCP connection from {peer} failed: {error:#}");
            }
        });
    }
}

/// Copies everything the peer sends back to it, then closes the write side after the
/// peer closes its own.
async fn echo_bytes(mut stream: TcpStream) -> Result<()> {
    let (mut reader, mut writer) = stream.split();
    tokio::io::copy(&mut reader, &mut writer).await?;
    tokio::io::AsyncWriteExt::shutdown(&mut writer).await?;
    Ok(())
}
