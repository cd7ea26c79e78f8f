// Plumbing shared by the Node seed receivers (tests/seeds.rs starts them): listen on 127.0.0.1
// only, on a free port written to the file named by argv[2], and keep a log of every request
// with what the receiver answered, served by GET /_log. The receivers' own handlers, in the
// seed files, are the documents' code.
'use strict';
const fs = require('fs');

const log = [];

// Wraps a handler: records the request (raw body, headers) and the status it answered.
function recorded(name, handler) {
  return (req, res) => {
    const entry = {
      receiver: name,
      path: req.path,
      headers: req.headers,
      raw: req.rawBody === undefined ? null : req.rawBody.toString('utf8'),
      parsed: req.body === undefined ? null : req.body,
      status: null,
      reply: null,
    };
    log.push(entry);
    const send = res.send.bind(res);
    res.send = (body) => {
      entry.status = res.statusCode;
      entry.reply = typeof body === 'string' ? body : JSON.stringify(body);
      return send(body);
    };
    try {
      handler(req, res);
    } catch (e) {
      entry.status = 500;
      entry.reply = 'receiver threw: ' + e.message;
      res.status(500);
      send('receiver threw: ' + e.message);
    }
  };
}

// Keeps the raw body beside what express.json() parsed (for the log only; a handler that
// verifies the raw bytes reads req.rawBody, as the document says it should).
function keepRaw(req, _res, buf) {
  req.rawBody = buf;
}

// Serves `app` on a free port of 127.0.0.1 (over HTTPS when `tls` holds https.createServer's
// options, e.g. a client certificate required), and the log on a second, plain-HTTP port, so
// the test reads it without a client certificate. Writes "<hook port> <log port>" to argv[2].
function listen(app, tls) {
  const express = require('express');
  const control = express();
  control.get('/_log', (_req, res) => res.json(log));
  const hooks = tls ? require('https').createServer(tls, app) : require('http').createServer(app);
  if (tls) {
    hooks.on('tlsClientError', (e) => log.push({ receiver: 'tls', tls_error: e.message }));
  }
  hooks.listen(0, '127.0.0.1', () => {
    const c = control.listen(0, '127.0.0.1', () => {
      const line = hooks.address().port + ' ' + c.address().port;
      const file = process.argv[2];
      fs.writeFileSync(file + '.tmp', line);
      fs.renameSync(file + '.tmp', file);
      console.log('listening on 127.0.0.1: ' + line);
    });
  });
  process.on('SIGTERM', () => process.exit(0));
}

module.exports = { recorded, keepRaw, listen, log };
